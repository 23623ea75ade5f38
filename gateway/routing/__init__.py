"""Where a request goes, decided on its head alone: pure functions over plain data, no I/O and no reactor.

`decision` is the head-time decision (`decide`: the request's form, its route, its method and declared size, an
`Admit` or a `Reject`); `router` matches a host and path to a route and makes the target the upstream receives;
`paths` computes the path a request is routed by; `cors` is a route's CORS policy (its preflights are answered
before admission). Authentication, authorisation and limits come after it, in
`gateway.auth`.

Nothing is imported here: `gateway.config` checks route prefixes with `paths`, and `router` imports the config.
"""
