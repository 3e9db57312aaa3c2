"""Quotas: atomic admission and settlement of rate limits and budgets across replicas.

``MemoryQuotaStore`` serves one process (the embedded default); ``RedisQuotaStore`` is shared
by every replica. Both implement ``QuotaStore`` with the same semantics.
"""

from __future__ import annotations

from gateway.quotas.memory import MemoryQuotaStore
from gateway.quotas.redis import RedisQuotaStore
from gateway.quotas.store import (
    BUDGET_DIMENSIONS,
    RATE_DIMENSIONS,
    Decision,
    Demand,
    Dimension,
    Limits,
    QuotaStore,
    QuotaStoreError,
    Scope,
    ScopeUsage,
    StoreUnavailable,
)

__all__ = [
    "BUDGET_DIMENSIONS",
    "RATE_DIMENSIONS",
    "Decision",
    "Demand",
    "Dimension",
    "Limits",
    "MemoryQuotaStore",
    "QuotaStore",
    "QuotaStoreError",
    "RedisQuotaStore",
    "Scope",
    "ScopeUsage",
    "StoreUnavailable",
]
