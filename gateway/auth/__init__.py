"""Admission beyond routing: who the caller is (authentication), what it may do (authorisation), and how much
(rate and concurrency limits), all decided on the request head.

`settings` reads the config; `credentials` parses credential headers; one module per method (`apikeys`, `jwt`,
`basic`, `forward`); `scopes` and `limits` decide; `gatekeeper` puts them in order for one request.
"""
