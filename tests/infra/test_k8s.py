"""infra/k8s: the Kustomize deployment, rendered and checked offline.

The kustomizations are rendered by tests/support/kustomize.py (the same output as ``kubectl
kustomize``, compared where kubectl is installed), every manifest is validated against the
Kubernetes API's JSON schemas that the ``kubernetes-validate`` package ships (strict: an
unknown field fails), and the properties the deployment depends on are asserted: GPU limits,
drain and grace periods, probes, the autoscaler's target, references that resolve, and no
secret in the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import msgspec
import pytest
import yaml

from serving.catalog import ModelSpec, default_catalog_path
from tests.support.kustomize import (
    CLUSTER_SCOPED,
    KustomizeError,
    apply_json_patch,
    container_env,
    containers,
    pod_spec,
    render,
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
#: The oldest Kubernetes the manifests are written for (README: requirements).
K8S_VERSION = "1.30"
NAMESPACE = "tollgate"
SECRET_NAME = "tollgate"  # noqa: S105 - the name of the Secret object, not a secret
VARIANTS = {"gpu": K8S, "cpu": K8S / "overlays" / "cpu"}
PLACEHOLDER = re.compile(r"^REPLACE_WITH_[A-Z_]+$")
SECRET_LIKE = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY", re.I)

Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    return {variant: render(path) for variant, path in VARIANTS.items()}


def find(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(manifest: Manifest, name: str) -> dict[str, Any]:
    (found,) = [c for c in containers(manifest) if c["name"] == name]
    return found


def secret_example() -> Manifest:
    secret: Manifest = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    return secret


def _key(manifest: Manifest) -> tuple[str, str, str]:
    meta = manifest["metadata"]
    return (manifest["kind"], meta.get("namespace", ""), meta["name"])


# -- rendering ---------------------------------------------------------------------------------


def test_json_patch_operations() -> None:
    doc: dict[str, Any] = {"a": {"b": [1, 2, 3], "c": "x"}, "d/e": 1}
    patched = apply_json_patch(
        doc,
        [
            {"op": "replace", "path": "/a/c", "value": "y"},
            {"op": "remove", "path": "/a/b/0"},
            {"op": "add", "path": "/a/b/-", "value": 4},
            {"op": "add", "path": "/a/f", "value": {"g": 1}},
            {"op": "remove", "path": "/d~1e"},
        ],
    )
    assert patched == {"a": {"b": [2, 3, 4], "c": "y", "f": {"g": 1}}}
    assert doc["a"]["b"] == [1, 2, 3], "the input is left as it was"
    with pytest.raises(KustomizeError):
        apply_json_patch(doc, [{"op": "replace", "path": "/a/missing", "value": 1}])
    with pytest.raises(KustomizeError):
        apply_json_patch(doc, [{"op": "move", "from": "/a", "path": "/b"}])


def test_renderer_refuses_what_it_does_not_understand(tmp_path: Path) -> None:
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\ncommonLabels: {app: x}\n")
    with pytest.raises(KustomizeError, match="commonLabels"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches: [{path: p.yaml}]\n"
    )
    with pytest.raises(KustomizeError, match="target"):
        render(tmp_path)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_renderer_agrees_with_kubectl(rendered: dict[str, list[Manifest]], variant: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the renderer's own checks above still ran")
    result = subprocess.run(
        [kubectl, "kustomize", str(VARIANTS[variant])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    theirs = {_key(m): m for m in yaml.safe_load_all(result.stdout) if m}
    ours = {_key(m): m for m in rendered[variant]}
    assert sorted(ours) == sorted(theirs)
    for key, manifest in ours.items():
        assert manifest == theirs[key], key


# -- schemas -----------------------------------------------------------------------------------


def test_the_schemas_ship_with_the_package() -> None:
    """kubernetes-validate reads its schemas from its own files: no network at test time."""
    from kubernetes_validate.utils import all_versions

    assert any(v.startswith(K8S_VERSION + ".") for v in all_versions()), all_versions()[-5:]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_manifest_is_valid(rendered: dict[str, list[Manifest]], variant: str) -> None:
    for manifest in [*rendered[variant], secret_example()]:
        try:
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{_key(manifest)}: {exc.message} at {list(exc.path)}", pytrace=False)


def test_the_validator_catches_a_misspelt_field(rendered: dict[str, list[Manifest]]) -> None:
    gateway = json.loads(json.dumps(find(rendered["gpu"], "Deployment", "tollgate-gateway")))
    gateway["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, K8S_VERSION, strict=True)
    job = json.loads(json.dumps(find(rendered["gpu"], "Job", "tollgate-migrate")))
    job["spec"]["backoffLimit"] = "ten"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


# -- what is deployed --------------------------------------------------------------------------


EXPECTED = {
    ("Namespace", NAMESPACE),
    ("ConfigMap", "tollgate-config"),
    ("ConfigMap", "tollgate-gateway-config"),
    ("ConfigMap", "tollgate-worker-config"),
    ("ConfigMap", "tollgate-models"),
    ("Deployment", "tollgate-gateway"),
    ("Service", "tollgate-gateway"),
    ("HorizontalPodAutoscaler", "tollgate-gateway"),
    ("PodDisruptionBudget", "tollgate-gateway"),
    ("Job", "tollgate-migrate"),
    ("StatefulSet", "tollgate-worker"),
    ("Service", "tollgate-worker"),
    ("PodDisruptionBudget", "tollgate-worker"),
    ("StatefulSet", "redis"),
    ("Service", "redis"),
    ("StatefulSet", "postgres"),
    ("Service", "postgres"),
    ("ConfigMap", "otel-collector-config"),
    ("Deployment", "otel-collector"),
    ("Service", "otel-collector"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_objects_of_the_deployment(rendered: dict[str, list[Manifest]], variant: str) -> None:
    found = [(m["kind"], m["metadata"]["name"]) for m in rendered[variant]]
    assert len(found) == len(set(found)), "an object is defined twice"
    assert set(found) == EXPECTED
    for manifest in rendered[variant]:
        namespace = manifest["metadata"].get("namespace")
        if manifest["kind"] in CLUSTER_SCOPED:
            assert namespace is None, _key(manifest)
        else:
            assert namespace == NAMESPACE, _key(manifest)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_container_has_probes_and_resources(
    rendered: dict[str, list[Manifest]], variant: str
) -> None:
    for manifest in rendered[variant]:
        spec = pod_spec(manifest)
        if spec is None:
            continue
        for c in spec["containers"]:
            where = (manifest["metadata"]["name"], c["name"])
            assert c["resources"]["requests"].get("cpu"), where
            assert c["resources"]["limits"].get("memory"), where
            if manifest["kind"] != "Job":
                assert "readinessProbe" in c, where
                assert "livenessProbe" in c, where
        for c in spec.get("initContainers", []):
            assert c["resources"]["limits"].get("memory"), (manifest["metadata"]["name"], c)


def _ports(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def _probe_port(c: dict[str, Any], probe: str) -> tuple[str, int]:
    get = c[probe]["httpGet"]
    port = get["port"]
    return get["path"], _ports(c)[port] if isinstance(port, str) else port


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_services_reach_their_pods(rendered: dict[str, list[Manifest]], variant: str) -> None:
    workloads = [m for m in rendered[variant] if pod_spec(m) is not None and m["kind"] != "Job"]
    for service in (m for m in rendered[variant] if m["kind"] == "Service"):
        selector = service["spec"]["selector"]
        (target,) = [
            w
            for w in workloads
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert selector.items() <= target["spec"]["selector"]["matchLabels"].items()
        names = {n for c in containers(target) for n in _ports(c)}
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in names | {port["port"]}, port


def test_gateway(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["gpu"]
    deployment = find(manifests, "Deployment", "tollgate-gateway")
    assert deployment["spec"]["replicas"] == 2
    gateway = container(deployment, "gateway")
    assert gateway["command"] == ["tollgate", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert _ports(gateway) == {"http": 8000}
    assert _probe_port(gateway, "readinessProbe") == ("/readyz", 8000)
    assert _probe_port(gateway, "livenessProbe") == ("/healthz", 8000)
    env = container_env(gateway, manifests)
    assert env["TOLLGATE_ENGINES"] == "workers"
    assert env["TOLLGATE_ROUTING"] in ("affinity", "round_robin")
    assert env["TOLLGATE_MIGRATE"] == "false"
    assert env["TOLLGATE_REDIS_URL"] == "redis://redis:6379/0"
    assert env["TOLLGATE_DATABASE_URL"] == (
        f"postgresql://tollgate:<secret {SECRET_NAME}/postgres-password>@postgres:5432/tollgate"
    )
    assert env["TOLLGATE_ADMIN_TOKEN"] == f"<secret {SECRET_NAME}/admin-token>"
    assert env["TOLLGATE_SECRET"] == f"<secret {SECRET_NAME}/secret>"
    init = container(deployment, "wait-for-migrations")
    assert container_env(init, manifests)["TOLLGATE_DATABASE_URL"] == env["TOLLGATE_DATABASE_URL"]
    assert init["image"] == gateway["image"], "it must know the head the gateway expects"
    service = find(manifests, "Service", "tollgate-gateway")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_autoscaler_targets_the_gateway(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["gpu"]
    hpa = find(manifests, "HorizontalPodAutoscaler", "tollgate-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    deployment = find(manifests, "Deployment", "tollgate-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= deployment["spec"]["replicas"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    metrics = hpa["spec"]["metrics"]
    assert metrics, "an autoscaler without metrics does nothing"
    for metric in metrics:
        if metric["type"] == "Resource":
            # Utilisation is a share of the request: the pods must request the resource.
            name = metric["resource"]["name"]
            assert container(deployment, "gateway")["resources"]["requests"][name]
        else:
            assert metric["type"] == "Pods", metric


def test_migrate_job(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["gpu"]
    job = find(manifests, "Job", "tollgate-migrate")
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert migrate["command"] == ["tollgate", "db", "upgrade"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    gateway = container(find(manifests, "Deployment", "tollgate-gateway"), "gateway")
    assert migrate["image"] == gateway["image"]
    assert (
        container_env(migrate, manifests)["TOLLGATE_DATABASE_URL"]
        == container_env(gateway, manifests)["TOLLGATE_DATABASE_URL"]
    )


def _database(tmp_path: Path) -> dict[str, str]:
    return {"TOLLGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'tollgate.db'}"}


def test_gateways_wait_for_the_migrations(
    rendered: dict[str, list[Manifest]], tmp_path: Path
) -> None:
    """The init container's script, run here against SQLite: it waits while the schema is
    behind and lets the gateway start once ``tollgate db upgrade`` has run."""
    init = container(find(rendered["gpu"], "Deployment", "tollgate-gateway"), "wait-for-migrations")
    assert init["command"][:2] == ["python", "-c"]
    argv = [sys.executable, "-c", init["command"][2]]
    env = {**os.environ, **_database(tmp_path)}
    with pytest.raises(subprocess.TimeoutExpired) as waiting:
        subprocess.run(argv, env=env, capture_output=True, timeout=6, check=False)
    out = waiting.value.stdout or b""  # bytes, whatever text= says
    assert b"waiting for tollgate-migrate" in out, waiting.value.stderr
    upgrade = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "db", "upgrade", "--data-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert upgrade.returncode == 0, upgrade.stderr
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_workers(rendered: dict[str, list[Manifest]], variant: str) -> None:
    manifests = rendered[variant]
    statefulset = find(manifests, "StatefulSet", "tollgate-worker")
    spec = statefulset["spec"]["template"]["spec"]
    worker = container(statefulset, "worker")
    assert worker["command"] == ["tollgate", "worker", "--host", "0.0.0.0", "--port", "8100"]
    assert _ports(worker) == {"http": 8100}
    assert _probe_port(worker, "readinessProbe") == ("/readyz", 8100)
    assert _probe_port(worker, "livenessProbe") == ("/healthz", 8100)

    gpus = worker["resources"]["limits"].get("nvidia.com/gpu")
    if variant == "gpu":
        assert str(gpus) == "1", "one GPU per worker pod"
        assert (
            worker["image"]
            != container(find(manifests, "Deployment", "tollgate-gateway"), "gateway")["image"]
        ), "GPU workers run the EXTRA=gpu build"
    else:
        assert gpus is None
        assert "tolerations" not in spec

    env = container_env(worker, manifests)
    assert env["TOLLGATE_WORKER_URL"] == "http://<field status.podIP>:8100"
    assert env["TOLLGATE_DEVICE_KIND"] == {"gpu": "cuda", "cpu": "cpu"}[variant]
    assert float(env["TOLLGATE_DEVICE_COST_PER_HOUR"]) > 0
    gateway_env = container_env(
        container(find(manifests, "Deployment", "tollgate-gateway"), "gateway"), manifests
    )
    for shared in ("TOLLGATE_REDIS_URL", "TOLLGATE_SECRET", "TOLLGATE_DEPLOYMENT"):
        assert env[shared] == gateway_env[shared], shared

    # The kubelet runs preStop, then sends SIGTERM, which starts the drain; it kills the pod
    # terminationGracePeriodSeconds after the start of preStop.
    pre_stop = worker["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep", pre_stop
    drain = float(env["TOLLGATE_DRAIN_TIMEOUT_S"])
    assert spec["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain + 10


def test_workers_headless_service(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["gpu"]
    service = find(manifests, "Service", "tollgate-worker")
    assert service["spec"]["clusterIP"] == "None"
    statefulset = find(manifests, "StatefulSet", "tollgate-worker")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]


def test_worker_models_are_a_valid_catalog(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["gpu"]
    statefulset = find(manifests, "StatefulSet", "tollgate-worker")
    worker = container(statefulset, "worker")
    models_file = Path(container_env(worker, manifests)["TOLLGATE_MODELS"])
    (mount,) = [m for m in worker["volumeMounts"] if m["mountPath"] == str(models_file.parent)]
    (volume,) = [
        v for v in statefulset["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    ]
    data = find(manifests, "ConfigMap", volume["configMap"]["name"])["data"]
    models = msgspec.convert(tomllib.loads(data[models_file.name])["models"], list[ModelSpec])
    demo = msgspec.convert(
        tomllib.loads(default_catalog_path().read_text())["models"], list[ModelSpec]
    )
    assert models == demo, "the ConfigMap's catalog is the demo catalog built into the image"


def test_stateful_stores_keep_their_data(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["gpu"]
    for name, mount in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data")):
        statefulset = find(manifests, "StatefulSet", name)
        (claim,) = statefulset["spec"]["volumeClaimTemplates"]
        (store,) = statefulset["spec"]["template"]["spec"]["containers"]
        assert {"name": claim["metadata"]["name"], "mountPath": mount} in store["volumeMounts"]
        assert find(manifests, "Service", name)["spec"]["ports"][0]["port"] in (5432, 6379)


def test_collector_runs_the_compose_configuration(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["gpu"]
    config = find(manifests, "ConfigMap", "otel-collector-config")["data"]["config.yaml"]
    assert yaml.safe_load(config) == yaml.safe_load(
        (ROOT / "infra" / "otel-collector.yaml").read_text()
    )
    deployment = find(manifests, "Deployment", "otel-collector")
    collector = container(deployment, "otel-collector")
    (mount,) = collector["volumeMounts"]
    assert f"--config={mount['mountPath']}/config.yaml" in collector["args"]
    assert _probe_port(collector, "readinessProbe") == ("/", 13133)
    service_ports = {
        p["port"] for p in find(manifests, "Service", "otel-collector")["spec"]["ports"]
    }
    assert {4317, 4318, 8889} <= service_ports
    gateway = container(find(manifests, "Deployment", "tollgate-gateway"), "gateway")
    endpoint = container_env(gateway, manifests)["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint == "http://otel-collector:4318", "the gateway's default is http/protobuf"


# -- secrets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_secret_is_written_down(rendered: dict[str, list[Manifest]], variant: str) -> None:
    manifests = rendered[variant]
    assert not [m for m in manifests if m["kind"] == "Secret"], (
        "applying the kustomization must not overwrite the operator's Secret"
    )
    for manifest in manifests:
        for key in (manifest.get("data") or {}) if manifest["kind"] == "ConfigMap" else ():
            assert not SECRET_LIKE.search(key), (_key(manifest), key)
        for c in containers(manifest):
            for entry in c.get("env", []):
                if SECRET_LIKE.search(entry["name"]):
                    assert "secretKeyRef" in entry.get("valueFrom", {}), (_key(manifest), entry)
                value = str(entry.get("value", ""))
                assert not re.search(r"://[^/:@]+:(?!\$\()[^@]+@", value), (
                    f"a password in a URL: {entry['name']}"
                )


def test_the_secret_template_holds_placeholders_only(rendered: dict[str, list[Manifest]]) -> None:
    secret = secret_example()
    assert secret["metadata"]["name"] == SECRET_NAME
    assert secret["metadata"]["namespace"] == NAMESPACE
    values = {**secret.get("stringData", {}), **secret.get("data", {})}
    for key, value in values.items():
        assert PLACEHOLDER.match(value), f"{key}: not an obvious placeholder"
    used = {
        (ref["name"], ref["key"])
        for variant in VARIANTS
        for m in rendered[variant]
        for c in containers(m)
        for e in c.get("env", [])
        if (ref := e.get("valueFrom", {}).get("secretKeyRef"))
    }
    assert used == {(SECRET_NAME, key) for key in values}, "the template lists the keys in use"
    assert "secret.example.yaml" not in (K8S / "kustomization.yaml").read_text().split("#")[0]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_config_map_reference_resolves(
    rendered: dict[str, list[Manifest]], variant: str
) -> None:
    manifests = rendered[variant]
    names = {m["metadata"]["name"] for m in manifests if m["kind"] == "ConfigMap"}
    for manifest in manifests:
        spec = pod_spec(manifest)
        if spec is None:
            continue
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in names, volume
        for c in containers(manifest):
            container_env(c, manifests)  # raises KeyError for a missing ConfigMap or key
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])} | {
                t["metadata"]["name"] for t in manifest["spec"].get("volumeClaimTemplates", [])
            }, (_key(manifest), mounts)


# -- models larger than one node ---------------------------------------------------------------


def _readme_models() -> list[ModelSpec]:
    readme = (K8S / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.S)
    assert blocks, "infra/k8s/README.md shows the models file of a multi-node model"
    return [
        m
        for block in blocks
        for m in msgspec.convert(tomllib.loads(block)["models"], list[ModelSpec])
    ]


def test_the_multi_node_example_is_a_valid_catalog_entry() -> None:
    (spec,) = _readme_models()
    assert spec.engine.extra["distributed_executor_backend"] == "ray"
    assert spec.engine.tensor_parallel_size > 1
    assert spec.engine.extra["pipeline_parallel_size"] > 1


def test_the_multi_node_example_names_real_vllm_engine_arguments() -> None:
    """Catalog ``extra`` goes to vLLM's ``AsyncEngineArgs`` unchanged: its keys must be fields
    there (checked in a child process: importing vLLM is slow and warns)."""
    (spec,) = _readme_models()
    code = textwrap.dedent(
        """
        import dataclasses, json, sys
        from vllm.engine.arg_utils import AsyncEngineArgs
        print(json.dumps(sorted(f.name for f in dataclasses.fields(AsyncEngineArgs))))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fields = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "tensor_parallel_size" in fields
    assert set(spec.engine.extra) <= fields, sorted(set(spec.engine.extra) - fields)
