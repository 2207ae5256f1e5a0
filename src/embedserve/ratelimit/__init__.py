"""Per-key rate limits: token buckets (`buckets`, pure), this process's own (`local`) or shared in Redis
(`redis_store`, with its outages handled by `failover`), and the limiter the server calls (`limiter`).
`open_limiter` builds the one the settings ask for; the public names are re-exported here."""

from __future__ import annotations

from collections.abc import Callable

from embedserve.ratelimit.buckets import WINDOW_S, Bucket, Kind, Level, Take, backoff_s, format_duration
from embedserve.ratelimit.limiter import BucketStore, KeyMeter, RateLimiter, TokenHold
from embedserve.ratelimit.local import LocalBuckets
from embedserve.settings import Settings


def check_store(settings: Settings) -> None:
    """Before binding: a --rate-limit-store that is a well-formed URL, with the Redis client installed
    (ConfigError in one line otherwise). Redis itself need not answer: the server starts without it."""
    if settings.rate_limit_store is not None:
        from embedserve.ratelimit.redis_store import parse_store_url, require_redis

        parse_store_url(settings.rate_limit_store)
        require_redis()


async def open_limiter(settings: Settings, on_store_error: Callable[[], None] = lambda: None) -> RateLimiter:
    """The limiter of `settings`: this process's buckets, or Redis's at --rate-limit-store (contacted
    once here: a store down at start-up is logged, and the server starts with its fallback)."""
    if settings.rate_limit_store is None:
        return RateLimiter(LocalBuckets())
    from embedserve.ratelimit.failover import Failover
    from embedserve.ratelimit.redis_store import RedisBuckets, parse_store_url

    shared = RedisBuckets(parse_store_url(settings.rate_limit_store))
    store = Failover(shared, fallback=settings.rate_limit_fallback, on_error=on_store_error)
    await store.start()
    return RateLimiter(store)


__all__ = [
    "WINDOW_S",
    "Bucket",
    "BucketStore",
    "KeyMeter",
    "Kind",
    "Level",
    "LocalBuckets",
    "RateLimiter",
    "Take",
    "TokenHold",
    "backoff_s",
    "check_store",
    "format_duration",
    "open_limiter",
]
