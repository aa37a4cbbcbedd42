#!/usr/bin/env python3
"""Deflate-capable WebSocket echo server (Python 3, autobahn + twisted).

Reference backend / testee for the Autobahn fuzzingclient: echoes every
text/binary message back as one message of the same type, accepts any
permessage-deflate offer (RFC 7692), and has no frame/message size limits
(Autobahn 9.* sends 16 MiB messages).

Run with the venv interpreter created by install.sh:
    .cache/autobahn/venv/bin/python scripts/autobahn/echo_server.py --port 9001
Prints "listening on ws://HOST:PORT" (flushed) once the socket is bound;
with --port 0 the kernel picks the port and the line tells which.
"""

import argparse
import signal
import sys
import zlib

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket import compress_deflate
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)
from twisted.internet import reactor


class EchoProtocol(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


class _ZlibWithLevel:
    """zlib stand-in for autobahn's deflate extension: compressobj() uses a
    fixed level. autobahn hardcodes Z_DEFAULT_COMPRESSION (6), which makes
    this server the bottleneck of the 12.*/13.* cases; the level is not
    observable by the peer."""

    def __init__(self, level):
        self.level = level

    def __getattr__(self, name):
        return getattr(zlib, name)

    def compressobj(self, level=zlib.Z_DEFAULT_COMPRESSION, *args, **kwargs):
        return zlib.compressobj(self.level, *args, **kwargs)


def accept_deflate(offers):
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True, help="TCP port (0 = pick a free one)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ap.add_argument("--no-deflate", action="store_true",
                    help="do not negotiate permessage-deflate (12.*/13.* become UNIMPLEMENTED)")
    ap.add_argument("--compress-level", type=int, default=1, choices=range(-1, 10),
                    metavar="{-1..9}", help="zlib level for outgoing compressed messages "
                    "(default 1; -1 = zlib default)")
    args = ap.parse_args(argv)

    if args.compress_level != zlib.Z_DEFAULT_COMPRESSION:
        compress_deflate.zlib = _ZlibWithLevel(args.compress_level)

    # No URL: autobahn then does not check the port in the Host header, so the
    # server also works behind a proxy/gateway that rewrites Host.
    factory = WebSocketServerFactory()
    factory.protocol = EchoProtocol
    factory.setProtocolOptions(
        failByDrop=False,            # send a close frame when failing (spec conformance)
        maxFramePayloadSize=0,       # 0 = unlimited
        maxMessagePayloadSize=0,     # 0 = unlimited
        autoFragmentSize=0,          # echo each message as a single frame
        openHandshakeTimeout=30,
        closeHandshakeTimeout=5,
    )
    if not args.no_deflate:
        factory.setProtocolOptions(perMessageCompressionAccept=accept_deflate)

    port = reactor.listenTCP(args.port, factory, interface=args.host, backlog=128)
    actual = port.getHost().port
    print("listening on ws://%s:%d" % (args.host, actual), flush=True)

    def stop(*_):
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    reactor.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
