"""The proxy exchange: one request, from its head read by the wire layer (`gateway.http1`) to its end, relayed to
an upstream and back with bounded memory.

`exchange` is the life of one request (`Exchange`: the head admitted, the body, the connection's end), built on
`forwarding` (the upstream request and the response relay) and `endings` (its state, and every way it ends); its
states are in `phases`, what it asks of the client end in `client_end`; `streaming` the two flow-controlled
pipes, the request body to the upstream and the response body to the client; `pool` one pool of connections per
upstream, with its concurrency cap and queue; `failures` what a client is answered when the upstream side fails;
`records` the access-log records; `context` what a request needs of the running gateway (`Gateway`, swapped whole
by a reload); `site` the factory of the gateway's client connections (`GatewayFactory`), and `web` the same
proxying inside a twisted.web site of your own (`GatewayResource`).

Nothing is imported here: the wire layer and the operations import the one module each needs.
"""
