"""TLS, both ways: `server` terminates it on the listeners (certificate sets chosen by SNI, swapped whole on a
reload; the verified client certificate of a connection), `upstream` speaks it to https upstreams (verification
and what a failed handshake is called), and `certificates` reads and checks the PEM files both use.

Nothing is imported here: `gateway.config` reads certificates with `certificates`, and loads no twisted.internet
module (tests/test_admission.py).
"""
