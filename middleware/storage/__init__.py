"""Storages: where leases, fences, queues and records live (memory, file, Redis)."""

from .base import Holder, HolderState, LeaseKind, LeaseStorage, RecordStorage, StoredLease, Ticket

__all__ = [
    "Holder",
    "HolderState",
    "LeaseKind",
    "LeaseStorage",
    "RecordStorage",
    "StoredLease",
    "Ticket",
]
