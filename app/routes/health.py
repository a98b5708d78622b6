"""Probes: ``/healthz`` says the process serves; ``/readyz`` also checks the lock backend.

Kept apart because they answer different questions: a load balancer should
stop sending traffic when the backend (e.g. Redis) is gone (``/readyz`` 503
``backend-unavailable``) or transcript appends fail (507 ``storage-failed``), while a supervisor should restart only a process
that stopped serving (``/healthz``).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

__all__ = ["healthz", "readyz", "routes"]


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    gateway = request.app.state.gateway
    await gateway.backend.ping()  # BackendUnavailable → 503 problem
    gateway.store.check_writable()  # StorageFailed → 507 problem while transcript appends fail
    return JSONResponse({"status": "ready"})


def routes() -> list[BaseRoute]:
    return [Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"])]
