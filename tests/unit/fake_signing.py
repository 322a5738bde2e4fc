"""An in-process gRPC server on loopback for a fake ``Signing`` servicer (client-library
unit tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent import futures

import grpc

from signer._pb.signet.v1 import signing_pb2_grpc


@contextlib.contextmanager
def serving(servicer: signing_pb2_grpc.SigningServicer, *, threads: int = 16) -> Iterator[str]:
    """Serve ``servicer`` without TLS on a free loopback port; yields ``127.0.0.1:port``."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads))
    signing_pb2_grpc.add_SigningServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)
