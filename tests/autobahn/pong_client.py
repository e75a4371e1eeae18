"""Autobahn's client (autobahn 0.10.9 on Twisted) answering the proxy's
Pings at once: ``.autobahn/env/bin/python pong_client.py URL SECONDS``.

Python 2.7 (the suite's environment). It sends a text message every 50 ms
for SECONDS, answers every Ping the moment it arrives (autobahn's default
onPing), closes with 1000, and prints one JSON line: the Pings it got (their
payloads), the messages it sent and the echoes it received.
"""

import json
import sys

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    connectWS,
)
from twisted.internet import reactor, task

EVERY = 0.05


class Client(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.loop = task.LoopingCall(self.send_one)
        self.factory.loop.start(EVERY)
        reactor.callLater(self.factory.seconds, self.finish)

    def send_one(self):
        self.factory.sent += 1
        self.sendMessage(("message " + str(self.factory.sent)).encode("utf-8"), False)

    def onPing(self, payload):
        self.factory.pings.append(payload.decode("latin-1"))
        WebSocketClientProtocol.onPing(self, payload)  # the Pong, at once

    def onMessage(self, payload, isBinary):
        self.factory.echoes += 1

    def finish(self):
        self.factory.loop.stop()
        # The last echoes first: close once every message came back (or 2 s).
        self.factory.deadline = reactor.seconds() + 2
        self.close_when_echoed()

    def close_when_echoed(self):
        if self.factory.echoes < self.factory.sent and reactor.seconds() < self.factory.deadline:
            reactor.callLater(EVERY, self.close_when_echoed)
            return
        self.sendClose(1000)

    def onClose(self, wasClean, code, reason):
        report = {
            "pings": self.factory.pings,
            "sent": self.factory.sent,
            "echoes": self.factory.echoes,
            "clean": wasClean,
        }
        sys.stdout.write(json.dumps(report) + "\n")
        sys.stdout.flush()
        reactor.stop()


def main():
    factory = WebSocketClientFactory(sys.argv[1])
    factory.protocol = Client
    factory.seconds = float(sys.argv[2])
    factory.pings, factory.sent, factory.echoes = [], 0, 0
    connectWS(factory)
    reactor.run()


if __name__ == "__main__":
    main()
