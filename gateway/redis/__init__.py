"""A small Redis client of the gateway's own: RESP2 over a Twisted protocol (`protocol`), and a pool of such
connections with per-command timeouts and reconnection (`client`). The limit store (`gateway.auth.redis_store`)
is its one user."""
