"""Container health probe for a Signet signer: exit 0 when gRPC health says SERVING.

Reads the signer's own config for the port and TLS files and calls grpc.health.v1.Health/Check
on 127.0.0.1 with the signer's certificate as the client certificate (the signer requires mTLS,
docs/adr/0003-mtls-identity.md), so the certificate needs the clientAuth usage as well as
serverAuth. ``--server-name`` overrides the name checked against the server certificate
(default ``localhost``). Exit codes: 0 SERVING, 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from signer.config import ServerConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("/etc/signet/signer.yaml"))
    parser.add_argument("--server-name", default="localhost")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    config = ServerConfig.load(args.config)
    target = f"127.0.0.1:{config.listen.rsplit(':', 1)[1]}"
    if config.tls is None:
        channel = grpc.insecure_channel(target)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=config.tls.ca.read_bytes(),
            private_key=config.tls.key.read_bytes(),
            certificate_chain=config.tls.cert.read_bytes(),
        )
        channel = grpc.secure_channel(
            target, credentials, options=[("grpc.ssl_target_name_override", args.server_name)]
        )
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"signer unreachable: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
