"""The gateway's own HTTP/1.1 wire layer, over llhttp (`httptools`): what goes on the wire and how it is read.

`heads` serialises heads and frames bodies (pure); `framing` reads the numbers that frame a body (pure); `fields`
holds a message's header fields. `server` is a client connection, reading its requests, on `lifecycle` (serving
one request at a time, refusals, timers) and `writer` (its responses); `serving` is what it hands over and asks
(`Message`, `RequestHandler`, `ConnectionOwner`). `upstream` is the connection to an upstream server, `exchange`
one request on it, `response` the response it hands over. `timers` is the one timer a connection measures its
waits with; `transports` names what the protocols use of their transport (for annotations).

Nothing here decides policy: limits, timeouts and error statuses are given by, or reported to, the caller; nothing
here imports the proxy exchange (`gateway.proxy`), which builds on it.
"""
