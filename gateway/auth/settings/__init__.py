"""The admission settings: consumers and their credentials, authentication methods, identity headers, limits,
and what each route accepts; read from the config file (and the credentials file it names) into frozen objects.

`model` is those objects; `admission` reads the admission tables (`parse_admission`, `parse_route_admission`), with
`consumers` for `[consumers.NAME]` and `methods` for `[auth.NAME]`; `values` is how their values are read.

Rules:
* No route is public by accident: every route says `auth = "anonymous"` or names the methods it accepts; a route
  that says neither is a config error, and so is a method name nobody defined.
* Secrets are never stored: API keys as SHA-256 hashes (`gateway-credentials api-key` mints them), passwords as
  bcrypt hashes. Key files are read and checked here, so `--check` and a reload fail on a bad one before anything
  changes; the runtime objects get the bytes, not the paths.
* An algorithm allow-list belongs to each JWT method and is checked against its key: `none` is never allowed,
  and an HMAC algorithm never shares a method with a public-key one (no algorithm confusion).
* A consumer claims client certificates by one field each ("cn:billing", "dns:billing.internal"), read into
  (field, value) so that no entry can match another field; no two consumers may claim the same one.

Nothing is imported here: the methods import `model` alone, and `gateway.config` the readers it needs.
"""
