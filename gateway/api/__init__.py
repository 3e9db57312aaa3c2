"""HTTP routes: the OpenAI-compatible API and health checks."""

from gateway.api.health import HealthController
from gateway.api.openai import OpenAIController

__all__ = ["HealthController", "OpenAIController"]
