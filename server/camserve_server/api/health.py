"""The standard gRPC health service (grpc.health.v1.Health), asyncio, with List.

grpcio-health-checking's asyncio servicer answers Check and Watch; List (in the protocol since
grpcio 1.71) is answered here from the same statuses. With an older grpcio-health-checking,
whose protocol has no List, the service offers Check and Watch only.
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer as _AsyncHealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(_AsyncHealthServicer):
    """Check, Watch and List of every service's status."""

    async def List(self, request, context):
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()})

    async def set_all(self, services, status) -> None:
        for name in services:
            await self.set(name, status)
