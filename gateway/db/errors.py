"""What the accounts store raises; none of it is worth retrying unchanged.

Exceptions::

    AccountError          base of the accounts store's errors
    ├── NotFound          no such tenant, key or policy (a deleted tenant counts as none)
    ├── Conflict          the change clashes with what is stored (a unique value taken)
    └── InvalidValue      a value is malformed or out of range; fix it and try again

A database that is down or unreachable raises SQLAlchemy's own errors
(`sqlalchemy.exc.OperationalError`), untouched: the caller decides what that means.
"""

from __future__ import annotations

__all__ = ["AccountError", "Conflict", "InvalidValue", "NotFound"]


class AccountError(Exception):
    """Base of the accounts store's errors."""


class NotFound(AccountError, LookupError):
    """No such tenant, key or policy; a deleted tenant is not found either."""


class Conflict(AccountError):
    """The change clashes with what is stored, such as a value that must be unique."""


class InvalidValue(AccountError, ValueError):
    """A value is malformed or out of range; the message says which and why."""
