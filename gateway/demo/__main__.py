"""`python -m gateway.demo [--host H] [--port P]`: the demo upstream on a port, until interrupted.

The composition root of the demo: the one place it names the global reactor.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import cast

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import globalLogBeginner, textFileLogObserver

from gateway.demo import endpoints

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    description = (endpoints.__doc__ or "").splitlines()[0]
    parser = argparse.ArgumentParser(prog="python -m gateway.demo", description=description)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8081, help="port to listen on; 0 picks a free one (default 8081)")
    args = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    # Twisted annotates the factory as a ServerFactory[...] of its default protocol type; any IProtocolFactory does.
    port = reactor.listenTCP(args.port, endpoints.make_factory(reactor), interface=args.host)  # type: ignore[arg-type]
    address = cast(IPv4Address | IPv6Address, port.getHost())  # a TCP port's
    # One line on stdout with the address, for whoever started us (tests, benchmarks) to read.
    print(json.dumps({"host": address.host, "port": address.port}), flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
