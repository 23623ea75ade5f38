"""The `twistd gateway` plugin: names gateway.tap and imports nothing of ours, so `twistd --help` stays cheap."""

from twisted.application.service import ServiceMaker

gateway = ServiceMaker(
    "gateway",
    "gateway.tap",
    "Streaming HTTP API gateway: routes, admits and streams requests to upstream services.",
    "gateway",
)
