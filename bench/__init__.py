"""The benchmark harness (see bench/README.md): run.py the command line and orchestration, peers.py the peers and
their configs, origins.py the origins (origin.py is the Python one), clients.py the load clients, scenarios.py
S1..S8, measure.py RSS and CPU from /proc, report.py the markdown, JSON and PNG output, procs.py child processes."""
