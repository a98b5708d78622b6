"""Prometheus series of the gateway itself (the session layer's are in ``sessiongate._metrics``).

Provider calls are counted per provider and outcome, failures per reason, so
a dashboard tells a slow or failing model apart from session contention
(which never shows up here: lock and lane errors are not provider errors).
Channel series show platform retries arriving (``duplicate``) and replies
that could not be delivered.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

__all__ = [
    "ALL_PROVIDERS_FAILED",
    "CHANNEL_DELIVERIES",
    "CHANNEL_DELIVERY_RETRIES",
    "CHANNEL_MESSAGES",
    "EVENT_LOOP_LAG",
    "PROVIDER_CALLS",
    "PROVIDER_FAILURES",
    "PROVIDER_SECONDS",
]

PROVIDER_CALLS = Counter(
    "sessiongate_provider_calls_total", "Model provider calls, by provider and outcome (ok / error)",
    ["provider", "outcome"],
)
PROVIDER_FAILURES = Counter(
    "sessiongate_provider_failures_total", "Model provider errors, by provider and reason", ["provider", "reason"]
)
PROVIDER_SECONDS = Histogram(
    "sessiongate_provider_seconds", "Duration of one model provider call", ["provider"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
ALL_PROVIDERS_FAILED = Counter(
    "sessiongate_all_providers_failed_total", "Turns for which every provider failed"
)
CHANNEL_MESSAGES = Counter(
    "sessiongate_channel_messages_total",
    "Inbound chat-platform messages, by channel and outcome (new / duplicate / in-progress / spooled)",
    ["channel", "outcome"],
)
CHANNEL_DELIVERIES = Counter(
    "sessiongate_channel_deliveries_total", "Replies handed to a chat platform, by channel and outcome (sent / failed)",
    ["channel", "outcome"],
)
CHANNEL_DELIVERY_RETRIES = Counter(
    "sessiongate_channel_delivery_retries_total",
    "Reply sends retried after a platform 429, 5xx or network error, by channel", ["channel"],
)
EVENT_LOOP_LAG = Histogram(
    "sessiongate_event_loop_lag_seconds",
    "How late the event loop woke a sleeper (sampled every 100 ms): time some work held the loop",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
