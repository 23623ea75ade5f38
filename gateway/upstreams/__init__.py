"""An upstream as a set of servers: how a request's server is chosen (`balancers`), which servers are left out
for failing (`ejection`), how much retrying an upstream may be given (`budget`), and each server's connections
and state (`servers`). The choices are pure state machines over a clock given to them; only `servers` does I/O.
"""
