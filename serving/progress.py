"""How far each engine's start-up has got, read from what the engines write to their log.

vLLM's engine processes say what they are doing on their standard output: which model a
worker starts to load, when it warms the model up (compiles it), and so on. When that output
goes to a file (the engines' log), `EngineLogWatcher` follows the file from a thread and
reports each model's phase as it changes: ``loading`` then ``compiling``. The phases before
and after (``starting``, ``ready``) come from the engine host itself. Lines are matched to a
model by the process id that writes them, learnt from the line that names the model's path.
A vLLM that words its lines differently only loses the middle phases, nothing else.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["EngineLogWatcher", "Progress"]

#: ``progress(model, phase)``: an engine's start-up moved on.
Progress = Callable[[str, str], None]

_PID = re.compile(r"\bpid=(\d+)\)")
_LOADING = re.compile(r"Starting to load model (\S+?)(?:\.\.\.)?$")
_COMPILING = (
    "Warming up model",
    "Compiling a graph",
    "torch.compile takes",
    "Capturing CUDA graph",
)


class EngineLogWatcher:
    """Follows the engines' log and reports phases until stopped.

    Args:
        path: The log file (appended to by the engine processes).
        sources: Each model's resolved source path, to its name.
        progress: Called from the watcher's thread with (model, phase).
        poll_s: How often the file is read.
    """

    def __init__(
        self,
        path: Path,
        sources: Mapping[str, str],
        progress: Progress,
        *,
        poll_s: float = 0.25,
    ) -> None:
        self.path = path
        self._sources = {str(Path(k)): v for k, v in sources.items()}
        self._progress = progress
        self._poll_s = poll_s
        self._models: dict[str, str] = {}  # pid -> model
        self._phase: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._offset = path.stat().st_size if path.exists() else 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following the file (the thread ends at its next poll)."""
        self._stop.set()

    def _run(self) -> None:
        pending = ""
        while not self._stop.wait(self._poll_s):
            try:
                with self.path.open("r", errors="replace") as log:
                    log.seek(self._offset)
                    chunk = log.read()
                    self._offset = log.tell()
            except OSError:
                continue
            pending += chunk
            *lines, pending = pending.split("\n")
            for line in lines:
                self.feed(line)

    def feed(self, line: str) -> None:
        """Take one line of the log."""
        pid = _PID.search(line)
        if pid is None:
            return
        loading = _LOADING.search(line.rstrip())
        if loading is not None:
            model = self._sources.get(str(Path(loading.group(1))))
            if model is not None:
                self._models[pid.group(1)] = model
                self._report(model, "loading")
            return
        model = self._models.get(pid.group(1))
        if model is not None and any(marker in line for marker in _COMPILING):
            self._report(model, "compiling")

    def _report(self, model: str, phase: str) -> None:
        if self._phase.get(model) != phase:
            self._phase[model] = phase
            self._progress(model, phase)
