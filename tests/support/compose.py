"""docker-compose.yml as Compose itself resolves it: ``docker-compose config``, parsed.

Compose v1 (``docker-compose``, Debian's package, which ``make services`` installs) and v2
(the ``docker compose`` plugin) are both understood. v1 prints every service whatever the
profiles, v2 only the active ones: :func:`active` applies Compose's rule either way. No
Docker engine is needed: ``config`` reads and interpolates the file, nothing more.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "COMPOSE_FILE",
    "REQUIRED_ENV",
    "ComposeMissing",
    "active",
    "compose_command",
    "config",
    "duration_s",
    "run_config",
]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
#: What the header of docker-compose.yml tells the operator to export.
REQUIRED_ENV = {
    "TOLLGATE_ADMIN_TOKEN": "tga_compose-config-admin-token-0123456789",
    "TOLLGATE_SECRET": "compose-config-secret-0123456789abcdef0123456789abcdef",
}


class ComposeMissing(RuntimeError):
    """Neither ``docker-compose`` nor ``docker compose`` is installed."""


def compose_command() -> list[str]:
    """The Compose command line to run: v1's ``docker-compose``, else v2's plugin."""
    if path := shutil.which("docker-compose"):
        return [path]
    if docker := shutil.which("docker"):
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    raise ComposeMissing(
        "neither `docker-compose` nor `docker compose` is installed: `make services` installs "
        "Debian's docker-compose package (apt-get install docker-compose)"
    )


def run_config(
    profiles: tuple[str, ...] = (), env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``config`` on docker-compose.yml in a clean environment plus ``env``."""
    argv = [*compose_command(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE)]
    for profile in profiles:
        argv += ["--profile", profile]
    argv.append("config")
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TOLLGATE_", "COMPOSE_", "OTEL_")) and k != "DOCKER_HOST"
    }
    return subprocess.run(
        argv,
        cwd=ROOT,
        env={**keep, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def config(profile: str | None) -> dict[str, Any]:
    """The resolved file with the operator's variables set, ``profile`` on."""
    profiles = (profile,) if profile else ()
    result = run_config(profiles, REQUIRED_ENV)
    assert result.returncode == 0, (
        f"{shlex.join(result.args)} exited with {result.returncode}:\n{result.stderr[-4000:]}"
    )
    parsed = yaml.safe_load(result.stdout)
    assert isinstance(parsed, dict), result.stdout[:2000]
    assert "services" in parsed, result.stdout[:2000]
    return parsed


def active(resolved: dict[str, Any], profile: str | None) -> dict[str, dict[str, Any]]:
    """The services that start under ``profile``: those without profiles, and its own."""
    return {
        name: service
        for name, service in resolved["services"].items()
        if not service.get("profiles") or profile in service["profiles"]
    }


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def duration_s(value: str | int | float) -> float:
    """A Compose duration (``1m15s``, ``75s``, ``500ms``; v2 prints plain numbers as ns)."""
    if isinstance(value, int | float):
        return float(value) / 1e9
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a Compose duration: {value!r}")
    return sum(float(n) * _UNIT_S[u] for n, u in parts)
