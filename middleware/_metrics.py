"""Prometheus metrics of the session layer, shared by the middleware and the gateway.

Defined once here so every module counts into the same series. They live in
prometheus-client's default registry; under ``--workers N`` the gateway sets
``PROMETHEUS_MULTIPROC_DIR`` before this module is imported, which makes the
same objects write to per-process files that ``/metrics`` aggregates.

prometheus-client is optional for the library (``sessiongate[metrics]``; the
gateway always has it): without it every series is an inert stand-in, so an
embedding app pays nothing for metrics it does not scrape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .storage import StoredLease

__all__ = [
    "CONTENTION_ANSWERS",
    "FENCING_REFUSALS",
    "LANE_WAIT_SECONDS",
    "QUEUE_DEPTH",
    "TAKEOVERS",
    "TURN_SECONDS",
    "WRITE_LOCK_HOLD_SECONDS",
    "WRITE_LOCK_WAIT_SECONDS",
    "count_takeover",
]


class _Inert:
    """A metric that records nothing: what every series is when prometheus-client is not installed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def labels(self, *args: Any, **kwargs: Any) -> _Inert:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


try:
    from prometheus_client import Counter, Gauge, Histogram
except ImportError:  # the library without the [metrics] extra
    Counter = Gauge = Histogram = _Inert  # type: ignore[assignment,misc]

_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_SLOW = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

LANE_WAIT_SECONDS = Histogram(
    "sessiongate_lane_wait_seconds", "Time from asking for a session's lane to having it", buckets=_SLOW
)
WRITE_LOCK_WAIT_SECONDS = Histogram(
    "sessiongate_write_lock_wait_seconds", "Time waited for a transcript write lock", buckets=_FAST
)
WRITE_LOCK_HOLD_SECONDS = Histogram(
    "sessiongate_write_lock_hold_seconds", "Time a transcript write lock was held", buckets=_FAST
)
TURN_SECONDS = Histogram("sessiongate_turn_seconds", "Time a session's lane was held for one turn", buckets=_SLOW)
CONTENTION_ANSWERS = Counter(
    "sessiongate_contention_answers_total",
    "Requests answered without running (session-busy, queue-full, rate-limited, ...)",
    ["type"],
)
QUEUE_DEPTH = Gauge(
    "sessiongate_queue_depth", "Messages waiting in session queues", multiprocess_mode="livesum"
)
TAKEOVERS = Counter(
    "sessiongate_takeovers_total", "Leases reclaimed from a dead or stale holder", ["kind", "reason"]
)
FENCING_REFUSALS = Counter(
    "sessiongate_fencing_refusals_total", "Transcript writes refused for an outdated fencing token"
)


def count_takeover(lease: StoredLease) -> None:
    """Count a grant that reclaimed a dead or stale holder (the storage set ``lease.reclaimed``)."""
    if lease.reclaimed is not None:
        TAKEOVERS.labels(kind=lease.holder.kind.value, reason=lease.reclaimed.value).inc()
