"""Instructions per small proxied request, counted by valgrind's callgrind: the same figure on every run.

`bench/micro.py` times the in-memory request path, and on a shared machine its figures move by a third from run to
run; the instructions the path executes do not. This runs `micro.py` under callgrind, counting only inside the
two entry points of the path (a client connection's and an upstream connection's `dataReceived`, by the names
mypyc gives them: the compiled build only), twice: serving `--requests` and twice as many. The difference divided
by `--requests` is what one more request costs, round trip: the harness, the imports and the set-up (the upstream
connections made, each connection's first request, begun before the count and never answered) are not in it. A
change to the request path is judged by this first, then by `bench/run.py --scenarios S5` on sockets.

Run: `.venv/bin/python bench/instructions.py [--requests 1000] [--connections 64] [--out FILE]` (needs valgrind:
`apt-get install valgrind`). `--out` keeps callgrind's file of the larger run, for `callgrind_annotate
--inclusive=yes FILE`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

ENTRY_POINTS = (  # mypyc's wrappers of the two methods
    "CPyPy_server___ClientConnection___dataReceived",
    "CPyPy_upstream___UpstreamConnection___dataReceived",
)


def count(requests: int, connections: int, out: Path, access_log: str = "") -> int:
    """Instructions executed inside the request path's entry points while `micro.py` serves `requests`."""
    command = [
        "valgrind",
        "--tool=callgrind",
        *(f"--toggle-collect={name}" for name in ENTRY_POINTS),
        f"--callgrind-out-file={out}",
        sys.executable,
        str(HERE / "micro.py"),
        "--requests",
        str(requests),
        "--batches",
        "1",
        "--connections",
        str(connections),
        *(["--access-log", access_log] if access_log else []),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1800)
    found = re.search(r"Collected\s*:\s*([\d,]+)", done.stderr)
    if found is None or not int(found.group(1).replace(",", "")):
        raise SystemExit(f"callgrind counted nothing (is the request path compiled?):\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--out", type=Path, help="keep callgrind's output here")
    parser.add_argument("--access-log", default="", help="with the JSON access log on, written to this file")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as directory:
        fewer = count(args.requests, args.connections, Path(directory) / "fewer.out", args.access_log)
        more = count(2 * args.requests, args.connections, args.out or Path(directory) / "more.out", args.access_log)
    per_request = (more - fewer) / args.requests
    extra = f"{args.requests} requests more, {args.connections} connections"
    print(f"{per_request:,.0f} instructions per request (the difference {extra} make)")


if __name__ == "__main__":
    main()
