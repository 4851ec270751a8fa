#include "App.h"
#include <cstdlib>
#include <iostream>
// uWebSockets' own EchoServer example with compression off, no TLS, listening on
// 127.0.0.1 at the port given as the first argument (perf/README.md compares against it).
int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 9001;
    struct PerSocketData {};
    uWS::App().ws<PerSocketData>("/*", {
        .compression = uWS::DISABLED,
        .maxPayloadLength = 100 * 1024 * 1024,
        .idleTimeout = 16,
        .maxBackpressure = 100 * 1024 * 1024,
        .closeOnBackpressureLimit = false,
        .resetIdleTimeoutOnSend = false,
        .sendPingsAutomatically = true,
        .message = [](auto *ws, std::string_view message, uWS::OpCode opCode) {
            ws->send(message, opCode, false);
        },
    }).listen("127.0.0.1", port, [port](auto *ls) {
        if (ls) std::cout << "Listening on port " << port << std::endl;
    }).run();
}
