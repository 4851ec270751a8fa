#include "App.h"
#include <cstdlib>
#include <iostream>
#include <string>
// The fan-out peer of perf/README.md: a connection to /sub/<topic> is subscribed to <topic>
// when it opens, and every message from a connection to /pub/<topic> is published to it
// (uWebSockets' publish, compression off, 1 MiB backpressure limit), as `examples/fanout`
// does for ringsock. Listens on 127.0.0.1 at the port given as the first argument.
int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 9001;
    struct PerSocketData { std::string topic; bool sub; };
    uWS::App *app = new uWS::App();
    app->ws<PerSocketData>("/*", {
        .compression = uWS::DISABLED,
        .maxPayloadLength = 16 * 1024 * 1024,
        .idleTimeout = 120,
        .maxBackpressure = 1024 * 1024,
        .closeOnBackpressureLimit = false,
        .resetIdleTimeoutOnSend = false,
        .sendPingsAutomatically = true,
        .upgrade = [](auto *res, auto *req, auto *context) {
            std::string url(req->getUrl());
            PerSocketData d;
            if (url.rfind("/sub/", 0) == 0) { d.sub = true; d.topic = url.substr(5); }
            else if (url.rfind("/pub/", 0) == 0) { d.sub = false; d.topic = url.substr(5); }
            else { res->writeStatus("404 Not Found")->end(); return; }
            res->template upgrade<PerSocketData>(std::move(d),
                req->getHeader("sec-websocket-key"), req->getHeader("sec-websocket-protocol"),
                req->getHeader("sec-websocket-extensions"), context);
        },
        .open = [](auto *ws) {
            auto *d = ws->getUserData();
            if (d->sub) ws->subscribe(d->topic);
        },
        .message = [app](auto *ws, std::string_view message, uWS::OpCode opCode) {
            auto *d = ws->getUserData();
            if (!d->sub) app->publish(d->topic, message, opCode, false);
        },
    }).listen("127.0.0.1", port, [port](auto *ls) {
        if (ls) std::cout << "Listening on port " << port << std::endl;
    }).run();
}
