"""Serving: co-located models on one device, each a batched vLLM engine.

Knows models, prompts, batches and devices; nothing of tenants, money or HTTP.
"""

from serving.catalog import Catalog, CatalogError, EngineOptions, ModelSpec, load_catalog
from serving.engine import (
    ChoiceDelta,
    EmbeddingBatch,
    EmbeddingEngine,
    EngineDead,
    EngineNotReady,
    EngineStats,
    GenerationChunk,
    GenerationEngine,
    InvalidPrompt,
    ModelEngine,
    SamplingOptions,
    ServingError,
    TokenLogprob,
    TopLogprob,
)
from serving.host import EngineHost, make_engine

__all__ = [
    "Catalog",
    "CatalogError",
    "ChoiceDelta",
    "EmbeddingBatch",
    "EmbeddingEngine",
    "EngineDead",
    "EngineHost",
    "EngineNotReady",
    "EngineOptions",
    "EngineStats",
    "GenerationChunk",
    "GenerationEngine",
    "InvalidPrompt",
    "ModelEngine",
    "ModelSpec",
    "SamplingOptions",
    "ServingError",
    "TokenLogprob",
    "TopLogprob",
    "load_catalog",
    "make_engine",
]
