"""State every replica keeps equal to the database's: loaded at start, reloaded every few
seconds (the serving policy, the deployed catalog)."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from typing import ClassVar

__all__ = ["Reloaded"]

logger = logging.getLogger(__name__)


class Reloaded(abc.ABC):
    """Reloads itself every ``refresh_s`` once started; a failed reload keeps what is in
    force and is tried again at the next turn."""

    #: What it is, and what stays in force when it cannot be loaded, for the log.
    what: ClassVar[str]
    meanwhile: ClassVar[str]

    def __init__(self, refresh_s: float) -> None:
        self._refresh_s = refresh_s
        self._task: asyncio.Task[None] | None = None

    @abc.abstractmethod
    async def reload(self) -> None:
        """Load the stored state and apply what changed."""

    async def start(self) -> None:
        """Load and apply it (a failure is logged and leaves what is in force), then follow
        its changes."""
        try:
            await self.reload()
        except Exception:
            logger.exception("could not load %s; %s", self.what, self.meanwhile)
        self._task = asyncio.create_task(self._follow(), name=f"reload {self.what}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.reload()
            except Exception:
                logger.warning("could not reload %s; keeping the one in force", self.what)
