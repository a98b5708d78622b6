"""Storages: where leases, fences, queues and records live, chosen from ``backend.url`` by scheme.

As in ``limits``, the URL's scheme picks the storage, and :data:`SCHEMES` below
is the one place that says which schemes exist and what each opens (config
validation, :func:`open_storage` and the rate limits all read it). A storage
module is imported only when its scheme is opened, so file or memory use never
imports redis.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._errors import ConfigError
from .base import (
    Holder,
    HolderState,
    LeaseKind,
    LeaseStorage,
    RecordStorage,
    StoredLease,
    Ticket,
    decode_holder,
    encode_holder,
)

if TYPE_CHECKING:
    from .._config import Settings

__all__ = [
    "SCHEMES",
    "Holder",
    "HolderState",
    "LeaseKind",
    "LeaseStorage",
    "RecordStorage",
    "Scheme",
    "StoredLease",
    "Ticket",
    "check_scheme",
    "decode_holder",
    "encode_holder",
    "is_shared",
    "open_storage",
    "scheme_of",
    "storage_class",
]


@dataclass(frozen=True)
class Scheme:
    """What a ``backend.url`` scheme opens."""

    storage: str  # "<module>:<class>", the module relative to this package, imported on first use
    shared: bool  # one state for every process and host (the rate limits then count there too)


SCHEMES: dict[str, Scheme] = {
    "file": Scheme(".file:FileStorage", shared=False),
    "memory": Scheme(".memory:MemoryStorage", shared=False),
    "redis": Scheme(".redis:RedisStorage", shared=True),
    "rediss": Scheme(".redis:RedisStorage", shared=True),
}


def scheme_of(url: str) -> str:
    """The scheme of a ``backend.url`` (``""`` when it has none)."""
    return url.split("://", 1)[0] if "://" in url else ""


def check_scheme(url: str) -> str:
    """``url``, if its scheme is registered; else a ``ValueError`` naming the ones that are."""
    if scheme_of(url) not in SCHEMES:
        *others, last = (f"{name}://" for name in SCHEMES)
        raise ValueError(f"must start with {', '.join(others)} or {last}")
    return url


def _scheme(url: str) -> Scheme:
    try:
        return SCHEMES[scheme_of(check_scheme(url))]
    except ValueError as exc:
        raise ConfigError("backend.url", f"{exc} (got {url!r})") from None


def is_shared(url: str) -> bool:
    """Whether the storage ``url`` names is one state for every process and host (Redis)."""
    return _scheme(url).shared


def storage_class(url: str) -> type[LeaseStorage]:
    """The storage class ``url``'s scheme names, importing its module now."""
    module_name, class_name = _scheme(url).storage.split(":")
    storage: type[LeaseStorage] = getattr(importlib.import_module(module_name, __name__), class_name)
    return storage


def open_storage(settings: Settings) -> LeaseStorage:
    """The storage ``backend.url`` names; :class:`ConfigError` on ``backend.url`` for an unknown scheme."""
    return storage_class(settings.backend.url).from_settings(settings)
