"""Admission beyond routing: who the caller is (authentication), what it may do (authorisation), and how much
(rate and concurrency limits), all decided on the request head.

`settings` is its config (the frozen settings, and the readers of their tables); `credentials` parses credential
headers; one module per method (`apikeys`, `jwt`, `basic`, `forward`), run by `authenticators`; `scopes`, `limits`
and `budgets` decide, `authorisation` admits and `denials` says why not; `gatekeeper` puts them in order for one
request.
"""

# The config package is imported before any module of this one: gateway.config reads the admission tables with
# `settings`, and `settings` reads them with gateway.config.values, so `settings` imported first would find
# gateway.config half made.
import gateway.config  # noqa: F401
