"""``/metrics`` in the Prometheus text format.

With several uvicorn workers each process writes its samples to files under
``PROMETHEUS_MULTIPROC_DIR`` (set by ``sessiongate serve``); the answer then
adds up every worker's files, whichever worker serves the scrape.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

__all__ = ["MULTIPROC_ENV", "forget_this_process", "metrics", "routes", "scrape_registry"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def scrape_registry() -> CollectorRegistry:
    if MULTIPROC_ENV not in os.environ:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def forget_this_process() -> None:
    """At a worker's shutdown: drop its live gauges from the multiprocess files (no-op with one process)."""
    if MULTIPROC_ENV in os.environ:
        multiprocess.mark_process_dead(os.getpid())


async def metrics(request: Request) -> Response:
    return Response(generate_latest(scrape_registry()), media_type=CONTENT_TYPE_LATEST)


def routes() -> list[BaseRoute]:
    return [Route("/metrics", metrics, methods=["GET"])]
