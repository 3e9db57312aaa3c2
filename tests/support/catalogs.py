"""Models files for gateways that need only part of the demo catalog."""

#: demo-chat alone, with a small KV cache: for extra replicas and benchmarks.
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
"""
