"""Running the gateway as a daemon: the service tree of one process and its listeners (`service`, `listeners`),
the worker processes (`workers`, `worker`) and the one admin listener that answers for all of them (`admin`,
`fleet`, `metrics`), the signals and systemd (`signals`, `sdnotify`), and bounded waits (`waits`), the versions
(`about`).

`gateway.tap` (the `twistd gateway` plugin's module) and `gateway.logs` (the service log's `--logger` observer)
stay at the top of the package: the plugin and the systemd unit name them.
"""
