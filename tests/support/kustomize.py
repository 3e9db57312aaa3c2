"""The Kustomize subset that infra/k8s uses, rendered in Python: no kubectl or kustomize needed.

A kustomization here may hold ``resources`` (manifest files, or directories with their own
kustomization), ``namespace``, ``images`` and ``patches`` that are JSON patches (RFC 6902)
with a ``target``. Anything else raises :class:`KustomizeError`: teach the renderer the new
form (tests/infra/test_k8s.py compares it with ``kubectl kustomize`` where kubectl exists),
do not skip it.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CLUSTER_SCOPED",
    "KustomizeError",
    "apply_json_patch",
    "container_env",
    "containers",
    "pod_spec",
    "render",
]

Manifest = dict[str, Any]

#: Kinds that live outside any namespace (the ones a kustomization here could hold).
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PersistentVolume",
        "PriorityClass",
        "StorageClass",
    }
)
_KNOWN_FIELDS = frozenset({"apiVersion", "kind", "resources", "namespace", "images", "patches"})
_POD_SPEC_PATHS = (
    ("spec", "template", "spec"),  # Deployment, StatefulSet, Job, DaemonSet
    ("spec", "jobTemplate", "spec", "template", "spec"),  # CronJob
    ("spec",),  # Pod
)


class KustomizeError(ValueError):
    """A kustomization form the renderer does not understand."""


def render(directory: Path) -> list[Manifest]:
    """The manifests ``kubectl kustomize directory`` would print, in resource order."""
    return _render(directory.resolve(), ())


def _render(directory: Path, seen: tuple[Path, ...]) -> list[Manifest]:
    if directory in seen:
        raise KustomizeError(f"a kustomization cycle through {directory}")
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory} has no kustomization.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    if unknown := set(spec) - _KNOWN_FIELDS:
        raise KustomizeError(f"{path}: fields the renderer does not understand: {sorted(unknown)}")
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{path}: kind {spec.get('kind')!r}")

    manifests: list[Manifest] = []
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            manifests.extend(_render(target, (*seen, directory)))
        elif target.is_file():
            manifests.extend(d for d in yaml.safe_load_all(target.read_text()) if d)
        else:
            raise KustomizeError(f"{path}: resource {entry} does not exist")

    for patch in spec.get("patches", []):
        _apply_patch(directory, path, patch, manifests)
    if "namespace" in spec:
        for manifest in manifests:
            if manifest["kind"] not in CLUSTER_SCOPED:
                manifest.setdefault("metadata", {})["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        _set_image(path, image, manifests)
    return manifests


def _apply_patch(
    directory: Path, path: Path, patch: dict[str, Any], manifests: list[Manifest]
) -> None:
    if set(patch) - {"path", "target"} or "path" not in patch or "target" not in patch:
        raise KustomizeError(f"{path}: only patches with a path and a target: {patch}")
    operations = yaml.safe_load((directory / patch["path"]).read_text())
    if not isinstance(operations, list):
        raise KustomizeError(f"{path}: {patch['path']} is not a JSON patch (a list of operations)")
    target = patch["target"]
    if set(target) - {"group", "version", "kind", "name", "namespace"}:
        raise KustomizeError(f"{path}: target selectors the renderer does not understand: {target}")
    matched = [m for m in manifests if _matches(m, target)]
    if not matched:
        raise KustomizeError(f"{path}: patch {patch['path']} matches no resource")
    for manifest in matched:
        patched = apply_json_patch(manifest, operations)
        manifest.clear()
        manifest.update(patched)


def _matches(manifest: Manifest, target: dict[str, str]) -> bool:
    group, _, version = manifest["apiVersion"].rpartition("/")
    metadata = manifest.get("metadata", {})
    return bool(
        target.get("kind", manifest["kind"]) == manifest["kind"]
        and target.get("name", metadata.get("name")) == metadata.get("name")
        and target.get("group", group) == group
        and target.get("version", version) == version
        and target.get("namespace", metadata.get("namespace")) == metadata.get("namespace")
    )


def _set_image(path: Path, image: dict[str, str], manifests: list[Manifest]) -> None:
    if set(image) - {"name", "newName", "newTag", "digest"}:
        raise KustomizeError(f"{path}: image fields the renderer does not understand: {image}")
    for manifest in manifests:
        for container in containers(manifest):
            name, tag = _split_image(container["image"])
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            if "digest" in image:
                container["image"] = f"{name}@{image['digest']}"
            else:
                tag = image.get("newTag", tag)
                container["image"] = f"{name}:{tag}" if tag else name


def _split_image(reference: str) -> tuple[str, str | None]:
    if "@" in reference:
        raise KustomizeError(f"image by digest: {reference}")
    name, sep, tag = reference.rpartition(":")
    if sep and "/" not in tag:
        return name, tag
    return reference, None


def pod_spec(manifest: Manifest) -> dict[str, Any] | None:
    """The pod spec of a workload (or a Pod); None for other kinds."""
    for keys in _POD_SPEC_PATHS:
        node: Any = manifest
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and "containers" in node:
            return node
    return None


def containers(manifest: Manifest) -> list[dict[str, Any]]:
    """Init containers, then containers, of a workload; none for other kinds."""
    spec = pod_spec(manifest)
    return [*spec.get("initContainers", []), *spec["containers"]] if spec else []


def container_env(container: dict[str, Any], manifests: list[Manifest]) -> dict[str, str]:
    """The environment the kubelet gives ``container``: ``envFrom`` ConfigMaps, then ``env``
    with ``$(VAR)`` expanded. A Secret's value reads ``<secret NAME/KEY>``, a field's
    ``<field PATH>``; a ConfigMap that is not among ``manifests`` raises KeyError."""
    config_maps = {
        m["metadata"]["name"]: m.get("data", {}) for m in manifests if m["kind"] == "ConfigMap"
    }
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" not in source or set(source) - {"configMapRef", "prefix"}:
            raise KustomizeError(f"envFrom form not understood: {source}")
        data = config_maps[source["configMapRef"]["name"]]
        env.update({source.get("prefix", "") + k: str(v) for k, v in data.items()})
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: env.get(m[1], m[0]),
                str(entry["value"]),
            )
            continue
        source = entry.get("valueFrom", {})
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[entry["name"]] = f"<secret {ref['name']}/{ref['key']}>"
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[entry["name"]] = str(config_maps[ref["name"]][ref["key"]])
        elif "fieldRef" in source:
            env[entry["name"]] = f"<field {source['fieldRef']['fieldPath']}>"
        else:
            raise KustomizeError(f"env form not understood: {entry}")
    return env


def apply_json_patch(document: Any, operations: list[dict[str, Any]]) -> Any:
    """``document`` with the RFC 6902 ``operations`` add, remove and replace applied."""
    result = copy.deepcopy(document)
    for operation in operations:
        op, pointer = operation.get("op"), operation.get("path")
        if op not in ("add", "remove", "replace") or not isinstance(pointer, str):
            raise KustomizeError(f"JSON patch operation not understood: {operation}")
        if not pointer.startswith("/"):
            raise KustomizeError(f"JSON pointer {pointer!r} does not start with /")
        *parents, last = [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]
        node = result
        for token in parents:
            node = node[int(token)] if isinstance(node, list) else node[token]
        if isinstance(node, list):
            if op == "add" and last == "-":
                node.append(copy.deepcopy(operation["value"]))
                continue
            index = int(last)
            if not 0 <= index < len(node) + (op == "add"):
                raise KustomizeError(f"{pointer}: index out of range")
            if op == "add":
                node.insert(index, copy.deepcopy(operation["value"]))
            elif op == "remove":
                del node[index]
            else:
                node[index] = copy.deepcopy(operation["value"])
        else:
            if op in ("remove", "replace") and last not in node:
                raise KustomizeError(f"{op} {pointer}: no such member")
            if op == "remove":
                del node[last]
            else:
                node[last] = copy.deepcopy(operation["value"])
    return result
