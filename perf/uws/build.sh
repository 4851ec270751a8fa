#!/bin/sh
# Builds the two uWebSockets apps the perf/README compares against: echo-uws (EchoUws.cpp) and
# fanout-uws (FanoutUws.cpp), each listening on 127.0.0.1 at the port given as its argument.
# Usage: perf/uws/build.sh UWEBSOCKETS_CHECKOUT  (uWebSockets 66dcff3 with its uSockets
# submodule, 86097c4, checked out). Epoll backend, no TLS, no compression. Not part of CI.
set -eu
src=$(cd "$(dirname "$0")" && pwd)
cd "$1"
(cd uSockets && gcc -O3 -march=native -flto=auto -DLIBUS_NO_SSL -Isrc -c src/*.c src/eventing/*.c src/crypto/*.c)
for app in EchoUws:echo-uws FanoutUws:fanout-uws; do
    g++ -march=native -O3 -flto=auto -std=c++2b -DUWS_NO_ZLIB -DLIBUS_NO_SSL -Isrc -IuSockets/src \
        "$src/${app%%:*}.cpp" uSockets/*.o -o "${app##*:}"
done
echo "built $1/echo-uws and $1/fanout-uws"
