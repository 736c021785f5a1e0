"""The CTR endpoint over gRPC: the same JSON request and response as `POST /v1/ctr`, carried by
Serve's gRPC proxy instead of its HTTP proxy.

One service, `din_ray.CTR`, one unary method, `Score`: the request message is the JSON body a
client would POST (raw bytes, UTF-8), the response message the JSON the HTTP endpoint returns.
There is no .proto to compile: both messages are plain bytes, so any gRPC client calls it with
identity (de)serializers. Errors come back as gRPC status codes (`STATUS_CODES`) with the HTTP
endpoint's error JSON as the details.

    din-ray serve --checkpoint runs/din --grpc-port 9000

    import grpc
    channel = grpc.insecure_channel("127.0.0.1:9000")
    score = channel.unary_unary(METHOD)           # bytes in, bytes out
    json.loads(score(body, metadata=[("authorization", "Bearer <token>")]))

Why JSON and not protobuf messages: the request carries the schema's features by name, as the
HTTP body does; one parser (`din_ray.serve.request`) validates both, so the two ingresses can
never disagree about what a request means. What gRPC saves over HTTP is measured in
`benchmarks/serve_latency.py --grpc` (docs/benchmarks.md).
"""

from __future__ import annotations

import grpc

SERVICE = "din_ray.CTR"
METHOD = f"/{SERVICE}/Score"
# Where Serve's config finds `add_servicer_to_server` (gRPCOptions.grpc_servicer_functions).
SERVICER_FUNCTION = "din_ray.serve.grpc_api.add_servicer_to_server"

# The HTTP endpoint's status -> the gRPC code a client gets for the same refusal.
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED, 422: grpc.StatusCode.INVALID_ARGUMENT}


class JSONMessage(bytes):
    """A response message: JSON bytes that Serve's replica can serialize (it calls
    `SerializeToString()` on what a gRPC method returns, as protobuf messages have)."""

    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name)
        return bytes(self)


def add_servicer_to_server(servicer, server: grpc.Server) -> None:
    """Register `din_ray.CTR/Score` on `server` with `servicer.Score` as its handler (Serve's
    proxy replaces the handler by its own, which routes to the replica's `Score` method, and
    keeps the (de)serializers: None, so messages stay bytes)."""
    handler = grpc.unary_unary_rpc_method_handler(servicer.Score)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Score": handler}),))
