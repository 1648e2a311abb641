"""Docker HEALTHCHECK for a kvcluster node: the standard gRPC health check.

Exit 0 when the node answers SERVING for the KV service (it has an agreed
ring), 1 otherwise. The address is the node's own listen address
(``KVCLUSTER_LISTEN``, a wildcard host meaning loopback), or ``argv[1]``.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "kvcluster.wire.v1.KV"


def target() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    host, _, port = os.environ.get("KVCLUSTER_LISTEN", "0.0.0.0:7101").rpartition(":")
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def main() -> int:
    address = target()
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=3.0
            )
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{address}: {name}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
