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
    EngineState,
    EngineStats,
    GenerationChunk,
    GenerationEngine,
    InvalidPrompt,
    ModelEngine,
    ResponseFormat,
    SamplingOptions,
    ServingError,
    TokenLogprob,
    TopLogprob,
)
from serving.fairqueue import FairQueue, Priority, QueueFull, RequestContext
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
    "EngineState",
    "EngineStats",
    "FairQueue",
    "GenerationChunk",
    "GenerationEngine",
    "InvalidPrompt",
    "ModelEngine",
    "ModelSpec",
    "Priority",
    "QueueFull",
    "RequestContext",
    "ResponseFormat",
    "SamplingOptions",
    "ServingError",
    "TokenLogprob",
    "TopLogprob",
    "load_catalog",
    "make_engine",
]
