"""The response cache: stores of answers, and single flight of identical requests."""

from gateway.cache.responses import CacheMode, CacheStatus, Flight, Recording, ResponseCache
from gateway.cache.store import CacheStore, CacheUnavailable, MemoryCacheStore, RedisCacheStore

__all__ = [
    "CacheMode",
    "CacheStatus",
    "CacheStore",
    "CacheUnavailable",
    "Flight",
    "MemoryCacheStore",
    "Recording",
    "RedisCacheStore",
    "ResponseCache",
]
