"""Autobahn's own echo server (autobahn 0.10.9 on Twisted), for the
conformance run: ``.autobahn/env/bin/python echo_server.py PORT``.

Python 2.7 (the suite's environment). ``wstest -m echoserver`` checks that
the Host header names its own port, which a proxy in front of it does not
do (the client names the proxy's), so its echo factory runs here with no URL
and so no ``externalPort``: no port check. Prints "listening" once bound.
"""

import sys

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor


class Echo(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


def main():
    factory = WebSocketServerFactory(None)
    factory.protocol = Echo
    # permessage-deflate offered by a client is accepted (cases 12 and 13).
    factory.setProtocolOptions(perMessageCompressionAccept=_accept_deflate)
    reactor.listenTCP(int(sys.argv[1]), factory, interface="127.0.0.1")
    sys.stdout.write("listening\n")
    sys.stdout.flush()
    reactor.run()


def _accept_deflate(offers):
    from autobahn.websocket.compress import (
        PerMessageDeflateOffer,
        PerMessageDeflateOfferAccept,
    )

    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


if __name__ == "__main__":
    main()
