"""Gateway settings, read once from ``TOLLGATE_*`` environment variables at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

from serving.catalog import default_catalog_path

__all__ = ["Settings", "SettingsError"]


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the gateway is configured with."""

    host: str = "127.0.0.1"
    port: int = 8000
    #: Where Tollgate keeps its files: demo models, the embedded database, its secret.
    data_dir: str = ".tollgate"
    #: The models file (TOML); the demo catalog when unset.
    models: str | None = None
    #: Request bodies larger than this get 413.
    max_body_bytes: int = 4 * 1024 * 1024
    #: Upper bounds on what one request may ask for.
    max_n: int = 16
    max_messages: int = 2048
    max_embedding_inputs: int = 2048
    log_level: str = "INFO"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def models_path(self) -> Path:
        return Path(self.models) if self.models is not None else default_catalog_path()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``TOLLGATE_<FIELD>`` variables, then ``overrides`` on top.

        Raises:
            SettingsError: a variable does not parse as its field's type.
        """
        env = os.environ if env is None else env
        raw: dict[str, object] = {}
        for field in msgspec.structs.fields(cls):
            value = env.get(f"TOLLGATE_{field.name.upper()}")
            if value is not None and value != "":
                raw[field.name] = value
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise SettingsError(f"invalid setting: {exc} (TOLLGATE_<FIELD> variables)") from exc
