"""The peer to beat: Twisted's own `twisted.web.proxy.ReverseProxyResource`, in front of one origin.

Run: `python bench/rpr.py --origin-port N --port 0`; prints {"port": N} on stdout.
"""

from __future__ import annotations

import argparse
import json

from twisted.internet import reactor
from twisted.web import proxy, server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--origin-port", type=int, required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    site = server.Site(proxy.ReverseProxyResource("127.0.0.1", args.origin_port, b""))
    site.noisy = False
    port = reactor.listenTCP(args.port, site, interface="127.0.0.1")
    print(json.dumps({"port": port.getHost().port}), flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
