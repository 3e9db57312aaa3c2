"""Models files for gateways that need only part of the demo catalog."""

#: demo-chat alone, with a small KV cache: for extra replicas. Eager (no graph compilation):
#: these gateways start and restart many times, and compiling costs seconds each time (the
#: compiled path runs in the benchmarks, with the catalogs users start with).
CHAT_ONLY = """
[[models]]
name = "demo-chat"
source = "{data_dir}/models/demo-chat"
kind = "chat"

[models.engine]
max_model_len = 512
dtype = "float32"
kv_cache_gb = 0.25
max_num_seqs = 128
extra = { enforce_eager = true }
"""

#: Both demo models, eager, with small KV caches: for the gateway whose engines the tests kill.
CHAT_AND_EMBEDDINGS = (
    CHAT_ONLY
    + """
[[models]]
name = "minilm"
source = "{data_dir}/models/minilm"
kind = "embedding"

[models.engine]
max_model_len = 256
dtype = "float32"
kv_cache_gb = 0.25
extra = { enforce_eager = true }
"""
)
