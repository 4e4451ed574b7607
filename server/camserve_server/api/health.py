"""The standard gRPC health service (grpc.health.v1.Health), asyncio, with List.

grpcio-health-checking's asyncio servicer answers Check and Watch; List is answered here from
the same statuses. With a grpcio-health-checking whose protocol has no List (1.81 and older:
``health_pb2`` has no ``HealthListRequest``; 1.85 has it), the service offers Check and Watch
only. ``process/server.py`` sets one status for the server as a whole ("") and one per API
(camserve.v1.CamserveService, inference.GRPCInferenceService): a probe may name either.
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
