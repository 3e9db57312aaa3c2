"""The models file: what it accepts, and how it names what is wrong."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from serving import CatalogError, load_catalog
from serving.catalog import default_catalog_path

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_demo_catalog_loads_with_aliases(data_dir: Path) -> None:
    catalog = load_catalog(default_catalog_path(), data_dir)
    assert [m.name for m in catalog] == ["demo-chat", "minilm"]
    chat = catalog.get("demo")
    assert chat is not None
    assert chat.name == "demo-chat"
    assert Path(chat.resolved_source).is_absolute()
    assert chat.engine.max_model_len == 2048
    embed = catalog.get("minilm")
    assert embed is not None
    assert embed.kind == "embedding"


def test_missing_source_names_the_entry(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[models]]\nname = "ghost"\nsource = "./nowhere/ghost-model"\nkind = "chat"\n',
    )
    with pytest.raises(CatalogError, match=r"model 'ghost'.*does not exist"):
        load_catalog(path, tmp_path)


def test_relative_sources_resolve_against_the_file(tmp_path: Path) -> None:
    model = tmp_path / "weights" / "tiny"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    path = write(tmp_path, '[[models]]\nname = "tiny"\nsource = "weights/tiny"\n')
    spec = load_catalog(path, tmp_path / "data").get("tiny")
    assert spec is not None
    assert spec.resolved_source == str(model.resolve())


def test_hub_ids_are_kept_as_written(tmp_path: Path) -> None:
    path = write(tmp_path, '[[models]]\nname = "qwen"\nsource = "Qwen/Qwen2.5-0.5B-Instruct"\n')
    spec = load_catalog(path, tmp_path).get("qwen")
    assert spec is not None
    assert spec.resolved_source == "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[models]]\nname = "a"\nsource = "x/y"\nkind = "vision"\n', "kind"),
        ('[[models]]\nname = "a"\nsource = "x/y"\ncolour = "red"\n', "colour"),
        ('[[models]]\nname = "a"\nsource = "x/y"\n[models.engine]\nmax_len = 3\n', "max_len"),
        (
            '[[models]]\nname = "a"\nsource = "x/y"\n[[models]]\nname = "a"\nsource = "x/z"\n',
            "twice",
        ),
        ('[[models]]\nname = "a b"\nsource = "x/y"\n', "not a valid model name"),
        ("models = []\n", "lists no models"),
        ("[[models]\n", "models file"),
    ],
)
def test_malformed_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        load_catalog(write(tmp_path, text), tmp_path)


def test_serve_refuses_a_catalog_entry_with_a_missing_path(tmp_path: Path) -> None:
    path = write(tmp_path, '[[models]]\nname = "ghost"\nsource = "/nonexistent/ghost"\n')
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--models", str(path), "--port", "1"],
        cwd=ROOT,
        env={
            **os.environ,
            "TOLLGATE_ADMIN_TOKEN": "tga_" + secrets.token_urlsafe(24),
            "TOLLGATE_DATA_DIR": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "model 'ghost'" in result.stderr
    assert "/nonexistent/ghost" in result.stderr
