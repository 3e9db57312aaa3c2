"""The TOLLGATE_* variables that docker-compose.yml and infra/k8s set are real settings.

A gateway reads ``gateway.settings.Settings`` and a worker ``serving.worker.WorkerSettings``
from ``TOLLGATE_<FIELD>``: a variable that names no field is ignored without a word, so a
misspelt one in a deployment file would silently leave its default in force. Each variable
must therefore be a field of its process's settings, and every value must parse.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from gateway.settings import Settings, SettingsError
from serving.worker import WorkerSettings
from tests.support.compose import active, config
from tests.support.kustomize import container_env, containers, render

ROOT = Path(__file__).resolve().parents[2]
K8S_VARIANTS = {"gpu": ROOT / "infra" / "k8s", "cpu": ROOT / "infra" / "k8s" / "overlays" / "cpu"}
GATEWAY_WORKLOADS = {"tollgate-gateway", "tollgate-migrate"}
WORKER_WORKLOADS = {"tollgate-worker"}

#: What a value looks like where it comes from a Secret or the pod's fields.
_REFERENCE = re.compile(r"<(secret|field) ([^>]+)>")


def filled(env: dict[str, str]) -> dict[str, str]:
    """``env`` with what a Secret or the pod's fields give at run time: plausible values."""

    def value(match: re.Match[str]) -> str:
        return "10.1.2.3" if match[2] == "status.podIP" else "x0123456789abcdef"

    return {k: _REFERENCE.sub(value, v) for k, v in env.items()}


Environment = tuple[str, str, dict[str, str]]


def settings_variables(role: str = "gateway") -> set[str]:
    kind = Settings if role == "gateway" else WorkerSettings
    return {f"TOLLGATE_{f.name.upper()}" for f in msgspec.structs.fields(kind)}


@pytest.fixture(scope="module")
def environments() -> list[Environment]:
    """(where, role, environment) of every gateway, migration and worker container."""
    found: list[Environment] = []
    for profile in ("cpu", "gpu"):
        for name, service in active(config(profile), profile).items():
            role = "gateway" if name in ("gateway", "migrate") else None
            role = role or ("worker" if name.startswith("worker-") else None)
            if role:
                env = {k: "" if v is None else str(v) for k, v in service["environment"].items()}
                found.append((f"compose {profile}: {name}", role, env))
    for variant, path in K8S_VARIANTS.items():
        manifests = render(path)
        for manifest in manifests:
            name = manifest["metadata"]["name"]
            if manifest["kind"] not in ("Deployment", "StatefulSet", "Job"):
                continue
            role = "gateway" if name in GATEWAY_WORKLOADS else None
            role = role or ("worker" if name in WORKER_WORKLOADS else None)
            if role is None:
                continue
            for c in containers(manifest):
                env = container_env(c, manifests)
                found.append((f"k8s {variant}: {manifest['kind']}/{name}/{c['name']}", role, env))
    return found


def test_every_deployment_file_is_covered(environments: list[Environment]) -> None:
    roles = {(where.split(":")[0], role) for where, role, _ in environments}
    assert roles == {
        (f"{kind} {variant}", role)
        for kind, variants in (("compose", ("cpu", "gpu")), ("k8s", ("cpu", "gpu")))
        for variant in variants
        for role in ("gateway", "worker")
    }


def test_variables_are_settings(environments: list[Environment]) -> None:
    problems = []
    for where, role, env in environments:
        known = settings_variables(role)
        unknown = sorted(k for k in env if k.startswith("TOLLGATE_") and k not in known)
        if unknown:
            problems.append(f"{where}: no {role} setting reads {unknown}")
    assert not problems, "\n".join(problems)


def test_values_parse_as_settings(environments: list[Environment]) -> None:
    problems = []
    for where, role, raw in environments:
        env = filled(raw)
        try:
            if role == "gateway":
                Settings.from_env(env)
            else:
                WorkerSettings.from_env(env)
        except (SettingsError, ValueError) as exc:
            problems.append(f"{where}: {exc}")
    assert not problems, "\n".join(problems)


def test_what_workers_mode_needs(environments: list[Environment]) -> None:
    problems = []
    for where, role, raw in environments:
        env = filled(raw)
        if role == "worker":
            needed = {"TOLLGATE_REDIS_URL", "TOLLGATE_SECRET", "TOLLGATE_WORKER_URL"}
            if missing := needed - set(env):
                problems.append(f"{where}: a worker needs {sorted(missing)}")
            if not re.fullmatch(r"http://[^/\s]+:\d+", env.get("TOLLGATE_WORKER_URL", "")):
                problems.append(f"{where}: TOLLGATE_WORKER_URL={env.get('TOLLGATE_WORKER_URL')}")
        elif Settings.from_env(env).engines == "workers" and "TOLLGATE_REDIS_URL" not in env:
            problems.append(f"{where}: workers mode needs TOLLGATE_REDIS_URL")
    assert not problems, "\n".join(problems)


def test_a_misspelt_variable_is_caught() -> None:
    """Settings ignores what it does not know: the check above is what catches this."""
    assert "TOLLGATE_REDIS_ULR" not in settings_variables() | settings_variables("worker")
    assert Settings.from_env({"TOLLGATE_REDIS_ULR": "redis://x"}).redis_url is None
