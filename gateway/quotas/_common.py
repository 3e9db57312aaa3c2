"""What both quota stores share: their retention constants and argument checks."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from gateway.quotas.store import Demand, Scope

#: How long a reservation record (and its lease) is kept past the lease, so that a late
#: settle still corrects the counters.
RECORD_MARGIN_S = 300
#: How long a settled request id stays refused.
TOMBSTONE_TTL_S = 3600


def check_partition(partition: str) -> None:
    if not partition or "{" in partition or "}" in partition:
        raise ValueError("partition must be non-empty and free of braces")


def check_admission(
    partition: str, scopes: Sequence[Scope], demand: Demand, lease_s: float
) -> None:
    check_partition(partition)
    if not demand.request_id:
        raise ValueError("request_id must be non-empty")
    if demand.tokens < 0 or demand.spend_nusd < 0:
        raise ValueError("demand must not be negative")
    if not lease_s > 0:
        raise ValueError("lease_s must be positive")
    if len({scope.name for scope in scopes}) != len(scopes):
        raise ValueError("scope names must be unique")
    for scope in scopes:
        if any(value is not None and value < 0 for value in msgspec.structs.astuple(scope.limits)):
            raise ValueError("limits must not be negative")


def check_settlement(partition: str, request_id: str, tokens: int, spend_nusd: int) -> None:
    check_partition(partition)
    if not request_id:
        raise ValueError("request_id must be non-empty")
    if tokens < 0 or spend_nusd < 0:
        raise ValueError("usage must not be negative")
