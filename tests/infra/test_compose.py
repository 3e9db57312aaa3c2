"""docker-compose.yml, the shared deployment in scale-out mode, as Compose resolves it.

``docker-compose config`` (or ``docker compose config``) reads, validates and interpolates
the file; the tests assert on what it prints, for the ``cpu`` and the ``gpu`` profile, and on
the files the services mount: infra/nginx.conf, infra/prometheus.yml, infra/otel-collector.yaml.
No Docker engine is needed. Compose missing is a failure that says how to install it.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.support.compose import (
    COMPOSE_FILE,
    REQUIRED_ENV,
    ComposeMissing,
    active,
    compose_command,
    config,
    duration_s,
    run_config,
)

ROOT = COMPOSE_FILE.parent
PROFILES = ("cpu", "gpu")
#: What runs whatever the profile: the worker of the profile comes on top.
CORE_SERVICES = {"redis", "postgres", "migrate", "gateway", "lb", "otel-collector", "prometheus"}
WORKERS = {"cpu": "worker-cpu", "gpu": "worker-gpu"}
GATEWAY_PORT, WORKER_PORT = 8000, 8100


@pytest.fixture(scope="module", autouse=True)
def compose_installed() -> None:
    try:
        compose_command()
    except ComposeMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def resolved() -> dict[str | None, dict[str, Any]]:
    """The resolved file per profile (None: no profile)."""
    return {profile: config(profile) for profile in (None, *PROFILES)}


def services(resolved: dict[Any, dict[str, Any]], profile: str | None) -> dict[str, Any]:
    return active(resolved[profile], profile)


def one_shots(svcs: dict[str, Any]) -> set[str]:
    """Services another one waits for to have exited successfully."""
    return {
        dep
        for service in svcs.values()
        for dep, how in _depends_on(service).items()
        if how.get("condition") == "service_completed_successfully"
    }


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):  # the short form: started, not healthy
        return {name: {"condition": "service_started"} for name in deps}
    return dict(deps)


def _argv(test: Any) -> list[str]:
    assert isinstance(test, list), test
    return [str(a) for a in test]


# -- the operator's variables ----------------------------------------------------------------


@pytest.mark.parametrize("missing", sorted(REQUIRED_ENV))
def test_config_refuses_to_run_without_the_shared_secrets(missing: str) -> None:
    env = {k: v for k, v in REQUIRED_ENV.items() if k != missing}
    result = run_config(("cpu",), env)
    assert result.returncode != 0, result.stdout
    assert missing in result.stderr, result.stderr


def test_the_header_says_how_to_run_it() -> None:
    header = "".join(
        line for line in COMPOSE_FILE.read_text().splitlines(keepends=True) if line[:1] == "#"
    )
    for variable in REQUIRED_ENV:
        assert f"export {variable}" in header or f" {variable}=" in header, variable
    assert "docker compose --profile cpu up --build" in header


def test_the_shared_secrets_reach_gateways_and_workers(resolved: dict[Any, Any]) -> None:
    for profile in PROFILES:
        svcs = services(resolved, profile)
        for name in ("gateway", WORKERS[profile]):
            env = svcs[name]["environment"]
            for variable, value in REQUIRED_ENV.items():
                assert env[variable] == value, (name, variable)


# -- which services, and in what order they start --------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_services_of_each_profile(resolved: dict[Any, Any], profile: str) -> None:
    svcs = services(resolved, profile)
    assert set(svcs) == CORE_SERVICES | {WORKERS[profile]}


def test_no_worker_without_a_profile(resolved: dict[Any, Any]) -> None:
    assert set(services(resolved, None)) == CORE_SERVICES


@pytest.mark.parametrize("profile", PROFILES)
def test_every_long_running_service_has_a_health_check(
    resolved: dict[Any, Any], profile: str
) -> None:
    svcs = services(resolved, profile)
    assert one_shots(svcs) == {"migrate"}
    for name, service in svcs.items():
        if name in one_shots(svcs):
            assert "healthcheck" not in service or service["healthcheck"].get("disable"), name
            continue
        check = service.get("healthcheck")
        assert check, f"{name} has no health check"
        assert not check.get("disable"), f"{name} has its health check disabled"
        assert _argv(check["test"])[0] in ("CMD", "CMD-SHELL"), (name, check)


@pytest.mark.parametrize("profile", PROFILES)
def test_dependencies_are_waited_for_not_just_started(
    resolved: dict[Any, Any], profile: str
) -> None:
    svcs = services(resolved, profile)
    shots = one_shots(svcs)
    for name, service in svcs.items():
        for dep, how in _depends_on(service).items():
            assert dep in svcs, f"{name} depends on {dep}, which does not run under {profile}"
            expected = "service_completed_successfully" if dep in shots else "service_healthy"
            assert how.get("condition") == expected, (name, dep, how)


@pytest.mark.parametrize("profile", PROFILES)
def test_start_order(resolved: dict[Any, Any], profile: str) -> None:
    svcs = services(resolved, profile)
    gateway = _depends_on(svcs["gateway"])
    assert gateway["migrate"]["condition"] == "service_completed_successfully"
    assert gateway["redis"]["condition"] == "service_healthy"
    assert _depends_on(svcs["migrate"])["postgres"]["condition"] == "service_healthy"
    assert _depends_on(svcs[WORKERS[profile]])["redis"]["condition"] == "service_healthy"
    assert _depends_on(svcs["lb"])["gateway"]["condition"] == "service_healthy"


# -- gateways ----------------------------------------------------------------------------------


def test_two_gateway_replicas_without_engines(resolved: dict[Any, Any]) -> None:
    gateway = services(resolved, "cpu")["gateway"]
    assert gateway["deploy"]["replicas"] == 2
    assert "ports" not in gateway, "replicas cannot share a host port: the lb publishes one"
    assert _argv(gateway["command"]) == [
        "tollgate",
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        str(GATEWAY_PORT),
    ]
    env = gateway["environment"]
    assert env["TOLLGATE_ENGINES"] == "workers"
    assert env["TOLLGATE_ROUTING"] in ("affinity", "round_robin")
    assert env["TOLLGATE_MIGRATE"] == "false"
    assert urlsplit(env["TOLLGATE_DATABASE_URL"]).hostname == "postgres"
    assert urlsplit(env["TOLLGATE_REDIS_URL"]).hostname == "redis"
    probe = " ".join(_argv(gateway["healthcheck"]["test"]))
    assert f"127.0.0.1:{GATEWAY_PORT}/readyz" in probe, probe


def test_migrate_runs_the_upgrade_against_the_gateways_database(resolved: dict[Any, Any]) -> None:
    svcs = services(resolved, "cpu")
    migrate = svcs["migrate"]
    assert _argv(migrate["command"]) == ["tollgate", "db", "upgrade"]
    assert (
        migrate["environment"]["TOLLGATE_DATABASE_URL"]
        == svcs["gateway"]["environment"]["TOLLGATE_DATABASE_URL"]
    )
    assert migrate["image"] == svcs["gateway"]["image"]
    assert Path(migrate["build"]["context"]).resolve() == ROOT
    assert (Path(migrate["build"]["context"]) / migrate["build"]["dockerfile"]).is_file()
    assert migrate["build"].get("args", {}).get("EXTRA", "cpu") == "cpu"


# -- workers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_workers(resolved: dict[Any, Any], profile: str) -> None:
    svcs = services(resolved, profile)
    name = WORKERS[profile]
    worker = svcs[name]
    assert _argv(worker["command"]) == [
        "tollgate",
        "worker",
        "--host",
        "0.0.0.0",
        "--port",
        str(WORKER_PORT),
    ]
    env = worker["environment"]
    assert env["TOLLGATE_WORKER_URL"] == f"http://{name}:{WORKER_PORT}"
    assert env["TOLLGATE_REDIS_URL"] == svcs["gateway"]["environment"]["TOLLGATE_REDIS_URL"]
    assert env["TOLLGATE_DEPLOYMENT"] == svcs["gateway"]["environment"]["TOLLGATE_DEPLOYMENT"]
    assert env["TOLLGATE_DEVICE_KIND"] == {"cpu": "cpu", "gpu": "cuda"}[profile]
    assert Decimal(env["TOLLGATE_DEVICE_COST_PER_HOUR"]) > 0
    assert "ports" not in worker, "gateways reach workers on the compose network only"
    # SIGTERM starts the drain: Compose must not kill the worker before it is over.
    assert duration_s(worker["stop_grace_period"]) > float(env["TOLLGATE_DRAIN_TIMEOUT_S"])
    probe = " ".join(_argv(worker["healthcheck"]["test"]))
    assert f"127.0.0.1:{WORKER_PORT}/readyz" in probe, probe


def test_the_cpu_worker_runs_the_vllm_cpu_image(resolved: dict[Any, Any]) -> None:
    svcs = services(resolved, "cpu")
    assert svcs["worker-cpu"]["image"] == svcs["migrate"]["image"]
    assert "deploy" not in svcs["worker-cpu"] or "resources" not in svcs["worker-cpu"]["deploy"]


def test_the_gpu_worker_reserves_one_nvidia_gpu(resolved: dict[Any, Any]) -> None:
    svcs = services(resolved, "gpu")
    worker = svcs["worker-gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert worker["build"]["args"]["EXTRA"] == "gpu"
    assert Path(worker["build"]["context"]).resolve() == ROOT
    assert worker["image"] != svcs["migrate"]["image"], "the CUDA build needs its own tag"


# -- the load balancer -------------------------------------------------------------------------


def _mount(service: dict[str, Any], target: str) -> Path:
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            if rest.split(":")[0] == target:
                return Path(source)
        elif volume.get("target") == target:
            return Path(volume["source"])
    raise AssertionError(f"nothing is mounted at {target}: {service.get('volumes')}")


def _nginx_blocks(text: str, kind: str) -> dict[str, str]:
    text = re.sub(r"#[^\n]*", "", text)
    return {m[1]: m[2] for m in re.finditer(rf"{kind}\s+(\S+)\s*\{{([^}}]*)\}}", text)}


def test_nginx_balances_over_the_gateway_replicas(resolved: dict[Any, Any]) -> None:
    lb = services(resolved, "cpu")["lb"]
    conf_path = _mount(lb, "/etc/nginx/conf.d/default.conf")
    assert conf_path.resolve() == (ROOT / "infra" / "nginx.conf")
    conf = conf_path.read_text()
    upstreams = _nginx_blocks(conf, "upstream")
    (proxied,) = re.findall(r"proxy_pass\s+http://([\w-]+)\s*;", conf)
    assert proxied in upstreams, (proxied, upstreams)
    servers = re.findall(r"^\s*server\s+(\S+?)(?:\s[^;]*)?;", upstreams[proxied], re.M)
    assert servers == [f"gateway:{GATEWAY_PORT}"], servers
    assert re.search(r"proxy_buffering\s+off\s*;", conf), "streams must not be buffered"
    listen = re.findall(r"listen\s+(\d+)\s*;", conf)
    published = [str(p.get("target") if isinstance(p, dict) else p) for p in lb["ports"]]
    assert listen, conf
    assert any(listen[0] in p for p in published), (listen, published)
    # The lb's own health check is answered by nginx, not passed to a gateway.
    probe = urlsplit(_argv(lb["healthcheck"]["test"])[-1])
    assert probe.port == int(listen[0])
    assert probe.path in _nginx_blocks(conf, r"location\s+=")


# -- telemetry ---------------------------------------------------------------------------------


def _collector_config() -> dict[str, Any]:
    collector: dict[str, Any] = yaml.safe_load((ROOT / "infra" / "otel-collector.yaml").read_text())
    return collector


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def test_collector_receives_otlp_over_grpc_and_http() -> None:
    collector = _collector_config()
    protocols = collector["receivers"]["otlp"]["protocols"]
    assert _port(protocols["grpc"]["endpoint"]) == 4317
    assert _port(protocols["http"]["endpoint"]) == 4318
    assert {"debug", "prometheus"} <= set(collector["exporters"])
    service = collector["service"]
    for extension in service.get("extensions", []):
        assert extension in collector["extensions"], extension
    for name, pipeline in service["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in collector.get(kind, {}), (name, kind, component)
        assert "otlp" in pipeline["receivers"], name
    assert "prometheus" in service["pipelines"]["metrics"]["exporters"]
    for component in collector["exporters"]:
        assert any(component in p["exporters"] for p in service["pipelines"].values())


def test_gateways_and_workers_export_to_the_collector(resolved: dict[Any, Any]) -> None:
    collector = _collector_config()
    http_port = _port(collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"])
    for profile in PROFILES:
        svcs = services(resolved, profile)
        for name in ("gateway", WORKERS[profile]):
            env = svcs[name]["environment"]
            # The gateway's OTLP exporters speak http/protobuf unless told grpc.
            protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
            endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
            assert endpoint.hostname == "otel-collector", name
            assert endpoint.port == (4317 if protocol == "grpc" else http_port), name
            assert env["OTEL_SERVICE_NAME"], name


def test_collector_health_check(resolved: dict[Any, Any]) -> None:
    svc = services(resolved, "cpu")["otel-collector"]
    mounted = _mount(svc, "/etc/otelcol-contrib/config.yaml")
    assert mounted.resolve() == ROOT / "infra" / "otel-collector.yaml"
    assert any(a.startswith("--config=/etc/otelcol-contrib/config.yaml") for a in svc["command"])
    test = _argv(svc["healthcheck"]["test"])
    probe = urlsplit(test[-1])
    assert probe.port == _port(_collector_config()["extensions"]["health_check"]["endpoint"])
    # The upstream image has no shell or client: the probe is the binary the build adds.
    dockerfile = Path(svc["build"]["context"]) / svc["build"]["dockerfile"]
    copied = re.findall(r"^COPY\s+--from=\S+\s+\S+\s+(\S+)\s*$", dockerfile.read_text(), re.M)
    assert test[1] in copied, (test, copied)


def test_prometheus_scrapes_gateways_workers_and_the_collector(
    resolved: dict[Any, Any],
) -> None:
    svc = services(resolved, "cpu")["prometheus"]
    config_path = _mount(svc, "/etc/prometheus/prometheus.yml")
    assert config_path.resolve() == ROOT / "infra" / "prometheus.yml"
    prometheus = yaml.safe_load(config_path.read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}

    def targets(job: dict[str, Any]) -> set[tuple[str, int]]:
        found = {(name, sd["port"]) for sd in job.get("dns_sd_configs", []) for name in sd["names"]}
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                found.add((host, int(port)))
        return found

    assert targets(jobs["tollgate-gateway"]) == {("gateway", GATEWAY_PORT)}
    assert targets(jobs["tollgate-worker"]) == {(w, WORKER_PORT) for w in WORKERS.values()}
    exporter_port = _port(_collector_config()["exporters"]["prometheus"]["endpoint"])
    assert targets(jobs["otel-collector"]) == {("otel-collector", exporter_port)}

    # /metrics wants the admin token: the service writes it where the config reads it.
    script = " ".join(svc["command"])
    for name in ("tollgate-gateway", "tollgate-worker"):
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"
        auth = jobs[name]["authorization"]
        assert auth.get("type", "Bearer") == "Bearer"
        token_file = auth["credentials_file"]
        assert f"> {token_file}" in script, (token_file, script)
        assert any(token_file.startswith(t.rstrip("/") + "/") for t in svc["tmpfs"]), svc
    assert re.search(r"\$\$?\{?TOLLGATE_ADMIN_TOKEN\b", script), script
    assert svc["environment"]["TOLLGATE_ADMIN_TOKEN"] == REQUIRED_ENV["TOLLGATE_ADMIN_TOKEN"]
    assert "/bin/prometheus" in script
    assert "--config.file=/etc/prometheus/prometheus.yml" in script


def test_every_bind_mount_exists(resolved: dict[Any, Any]) -> None:
    for profile in PROFILES:
        for name, service in services(resolved, profile).items():
            for volume in service.get("volumes", []):
                source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
                if volume_is_bind(volume):
                    assert Path(source).exists(), (name, source)


def volume_is_bind(volume: str | dict[str, Any]) -> bool:
    if isinstance(volume, dict):
        return bool(volume.get("type") == "bind")
    return volume.startswith(("/", "."))
