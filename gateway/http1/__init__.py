"""The gateway's own HTTP/1.1 wire layer, over llhttp (`httptools`): what goes on the wire and how it is read.

`heads` serialises heads and frames bodies (pure); `upstream` is the connection to an upstream server;
`transports` names what the protocols use of their transport (for annotations). Nothing here decides policy:
limits, timeouts and error statuses are given by, or reported to, the caller.
"""
