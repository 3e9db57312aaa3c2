"""What request handlers share: engines, accounts, admission and the server's secrets."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from gateway.admission import Admission
from gateway.auth import Authenticator
from gateway.cache import ResponseCache
from gateway.db import AccountStore
from gateway.deployments import CatalogSync
from gateway.policy import ServingControl
from gateway.settings import Settings
from gateway.telemetry import Telemetry
from gateway.usage import UsageRecorder
from serving import EngineHost

__all__ = ["Services"]


@dataclass(frozen=True, eq=False, repr=False)
class Services:
    """One per process; handed to handlers by dependency injection."""

    settings: Settings
    host: EngineHost
    telemetry: Telemetry
    accounts: AccountStore
    admission: Admission
    authenticator: Authenticator
    #: The key-hashing secret (never logged: this class has no repr of its fields).
    secret: bytes
    #: Prices usage and appends its events to the outbox.
    usage: UsageRecorder
    #: Answers of deterministic requests, and the generations in flight.
    cache: ResponseCache
    #: The operator's serving policy: cache, queues, shares.
    policy: ServingControl
    #: What ``/metrics`` renders.
    metrics: CollectorRegistry
    #: The deployed catalog (``None`` when the host's engines are someone else's to run).
    catalog: CatalogSync | None = None

    def __repr__(self) -> str:
        return "Services()"
