"""Tollgate's gateway: the stateless HTTP front of the stack."""

from gateway.app import create_app
from gateway.settings import Settings

__all__ = ["Settings", "create_app"]
