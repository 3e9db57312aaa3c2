"""HTTP routes: the OpenAI-compatible API, the admin API and health checks."""

from gateway.api.admin import AdminController
from gateway.api.billing import BillingController
from gateway.api.health import HealthController
from gateway.api.metrics import MetricsController
from gateway.api.openai import OpenAIController

__all__ = [
    "AdminController",
    "BillingController",
    "HealthController",
    "MetricsController",
    "OpenAIController",
]
