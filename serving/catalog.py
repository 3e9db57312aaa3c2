"""The model catalog: which models a process serves, from a TOML file.

A catalog file holds one ``[[models]]`` table per model::

    [[models]]
    name = "demo-chat"
    source = "{data_dir}/models/demo-chat"   # a local path, or a hub id already in the cache
    kind = "chat"                             # or "embedding"
    aliases = ["demo"]

    [models.engine]
    max_model_len = 2048
    dtype = "float32"
    kv_cache_gb = 1.0

``{data_dir}`` stands for Tollgate's data directory; other relative paths are taken relative
to the catalog file.
"""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "AdapterSpec",
    "Catalog",
    "CatalogError",
    "EngineOptions",
    "ModelSpec",
    "check_spec",
    "default_catalog_path",
    "load_catalog",
    "spec_document",
]

ModelKind = Literal["chat", "embedding"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,127}$")
#: An adapter is called ``model:adapter``, so neither name holds a colon.
_ADAPTER = re.compile(r"^[A-Za-z0-9][\w.-]{0,63}$")


class CatalogError(ValueError):
    """The catalog file is malformed or names something that is not there."""


class EngineOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Engine arguments of one model; what is not set keeps vLLM's default."""

    max_model_len: int | None = None
    dtype: str = "auto"
    #: KV cache budget in GiB (CPU: host memory; GPU: device memory for the cache).
    kv_cache_gb: float | None = None
    #: Fraction of GPU memory the engine may take; ignored on CPU.
    gpu_memory_utilization: float | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    #: Unset: on for generation models, off for embedding models (encoders cannot share).
    enable_prefix_caching: bool | None = None
    tensor_parallel_size: int = 1
    #: Tokens per streamed chunk after the first (vLLM's ``stream_interval``): larger values
    #: cut per-chunk work under load at the cost of smoothness.
    stream_interval: int = 1
    seed: int = 0
    #: LoRA adapters resident on the device at once (vLLM's ``max_loras``; the adapters
    #: beyond wait in host memory, least recently used out). Unset: 4 when the model has
    #: adapters, LoRA off otherwise. Setting it keeps LoRA on, so that adapters can be
    #: registered later without a new engine.
    max_loras: Annotated[int, msgspec.Meta(ge=1)] | None = None
    #: The largest adapter rank the engine takes (vLLM's ``max_lora_rank``).
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = 16
    #: Further ``AsyncEngineArgs`` fields passed through unchanged.
    extra: dict[str, Any] = msgspec.field(default_factory=dict)


class AdapterSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A LoRA adapter of a model (PEFT's layout on disk: ``adapter_config.json`` and the
    weights), served as ``model:name`` on the model's engine."""

    name: str
    #: A local path, as a model's ``source`` (``{data_dir}``, relative to the models file).
    source: str
    #: Filled in by :func:`check_spec`.
    resolved_source: str = ""


class ModelSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One catalog entry."""

    name: str
    source: str
    kind: ModelKind = "chat"
    aliases: tuple[str, ...] = ()
    engine: EngineOptions = msgspec.field(default_factory=EngineOptions)
    #: Its footprint on the device in GiB (weights plus KV budget) until it is measured
    #: after its first start; unset: estimated from the weights' files and ``kv_cache_gb``.
    memory_gb: Annotated[float, msgspec.Meta(gt=0)] | None = None
    #: Never taken off the device to make room or for being idle.
    pin: bool = False
    #: Taken off the device after this long without requests; unset: the pool's default.
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    #: LoRA adapters served on this model's engine, as ``model:adapter``.
    adapters: tuple[AdapterSpec, ...] = ()
    #: Filled in by :func:`load_catalog`: an absolute path, or the hub id as written.
    resolved_source: str = ""


class _CatalogFile(msgspec.Struct, forbid_unknown_fields=True):
    models: list[ModelSpec]


class Catalog:
    """The models of one process, looked up by name or alias."""

    def __init__(self, models: list[ModelSpec]) -> None:
        self.models = tuple(models)
        self._by_name: dict[str, ModelSpec] = {}
        for spec in models:
            for name in (spec.name, *spec.aliases):
                if name in self._by_name:
                    raise CatalogError(f"model name or alias {name!r} is used twice")
                self._by_name[name] = spec

    def get(self, name: str) -> ModelSpec | None:
        """The entry called ``name`` (or aliased so), if any."""
        return self._by_name.get(name)

    def resolve(self, name: str) -> tuple[ModelSpec, AdapterSpec | None] | None:
        """The entry ``name`` calls for: a model (or alias), or ``model:adapter``."""
        spec = self._by_name.get(name)
        if spec is not None:
            return spec, None
        base, sep, adapter = name.rpartition(":")
        spec = self._by_name.get(base) if sep else None
        if spec is None:
            return None
        found = next((a for a in spec.adapters if a.name == adapter), None)
        return (spec, found) if found is not None else None

    def with_model(self, spec: ModelSpec) -> Catalog:
        """This catalog with ``spec`` added, or in place of the entry of its name.

        Raises:
            CatalogError: one of its names or aliases is another entry's.
        """
        models = [m for m in self.models if m.name != spec.name]
        return Catalog([*models, spec])

    def without(self, name: str) -> Catalog:
        return Catalog([m for m in self.models if m.name != name])

    def __iter__(self) -> Any:
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)


def default_catalog_path() -> Path:
    """The demo catalog shipped with the package."""
    return Path(str(resources.files("serving.demo").joinpath("catalog.toml")))


def _resolve_source(spec: ModelSpec, catalog_dir: Path, data_dir: Path) -> str:
    raw = spec.source.replace("{data_dir}", str(data_dir.resolve()))
    path = Path(raw).expanduser()
    if not path.is_absolute():
        if _HUB_ID.match(raw) and not (catalog_dir / path).exists():
            return raw  # a hub id; loaded from the local cache only, never downloaded
        path = catalog_dir / path
    if not path.exists():
        raise CatalogError(
            f"model {spec.name!r}: source {spec.source!r} does not exist (looked at {path}); "
            "for the demo models run `tollgate models prepare`"
        )
    if not (path / "config.json").is_file():
        raise CatalogError(f"model {spec.name!r}: {path} has no config.json")
    return str(path.resolve())


def check_spec(spec: ModelSpec, base_dir: Path, data_dir: Path) -> ModelSpec:
    """``spec`` with its source resolved (relative paths against ``base_dir``).

    Raises:
        CatalogError: a name is not valid, or the source does not exist (the message names
            it).
    """
    for name in (spec.name, *spec.aliases):
        if not _NAME.match(name):
            raise CatalogError(f"model {spec.name!r}: {name!r} is not a valid model name")
    resolved = _resolve_source(spec, base_dir, data_dir)
    adapters = []
    seen: set[str] = set()
    for adapter in spec.adapters:
        if not _ADAPTER.match(adapter.name) or adapter.name in seen:
            raise CatalogError(
                f"model {spec.name!r}: adapter name {adapter.name!r} is not valid or used twice"
            )
        seen.add(adapter.name)
        path = Path(adapter.source.replace("{data_dir}", str(data_dir.resolve()))).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not (path / "adapter_config.json").is_file():
            raise CatalogError(
                f"model {spec.name!r}: adapter source {adapter.source!r} has no "
                f"adapter_config.json (looked at {path})"
            )
        adapters.append(msgspec.structs.replace(adapter, resolved_source=str(path.resolve())))
    return msgspec.structs.replace(spec, resolved_source=resolved, adapters=tuple(adapters))


def spec_document(spec: ModelSpec) -> bytes:
    """The entry as stored and compared: as written, without what this process resolved."""
    adapters = tuple(msgspec.structs.replace(a, resolved_source="") for a in spec.adapters)
    return msgspec.json.encode(msgspec.structs.replace(spec, resolved_source="", adapters=adapters))


def load_catalog(path: Path, data_dir: Path) -> Catalog:
    """Read and check a catalog file; every local source must exist.

    Raises:
        CatalogError: naming the entry that is wrong.
    """
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CatalogError(f"models file {path} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"models file {path}: {exc}") from exc
    try:
        parsed = msgspec.convert(raw, _CatalogFile)
    except msgspec.ValidationError as exc:
        raise CatalogError(f"models file {path}: {exc}") from exc
    if not parsed.models:
        raise CatalogError(f"models file {path} lists no models")
    return Catalog([check_spec(spec, path.parent, data_dir) for spec in parsed.models])
