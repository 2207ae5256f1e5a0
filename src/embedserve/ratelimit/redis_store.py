"""Token buckets in Redis, shared by every process and replica using it: each change is one Lua script
run atomically on the server (refill, resize, give back, check and take), on Redis's own clock, so the
replicas' clocks never matter (design note 53). `redis` is an extra, imported only here, when used."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from embedserve.errors import ConfigError, RateLimitStoreUnavailable
from embedserve.ratelimit.buckets import WINDOW_S, Level, Take

if TYPE_CHECKING:
    from redis.asyncio import Redis

#: Every call to Redis gives up after this long (connect included): on a LAN a call takes well under a
#: millisecond, and a request must not wait long on a store that has gone.
TIMEOUT_S = 0.5
#: A bucket's key: the key id in braces (a Redis Cluster hash tag: a key's two buckets share a slot).
KEY_FORMAT = "embedserve:ratelimit:{{{key_id}}}:{kind}"
_DB = re.compile(r"^/?(\d*)$")

# KEYS: the buckets. ARGV[1]: the time in seconds ("" : Redis's TIME), then per bucket its limit, the
# amount to take, the amount to give back and "1" to take what is there when the amount is not.
# Numbers go in and out as strings of 17 digits: Lua's numbers are doubles, as Python's floats, and a
# number in a reply would be cut to an integer. The arithmetic is buckets.Bucket.apply's, line by line.
# A bucket expires once it would be full again (a missing bucket and a full one are the same), plus 1 s.
TAKE_LUA = """
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local window = tonumber(ARGV[2])
local function fmt(x) return string.format('%.17g', x) end
local out = {}
for i, key in ipairs(KEYS) do
  local base = 2 + (i - 1) * 4
  local limit = tonumber(ARGV[base + 1])
  local amount = tonumber(ARGV[base + 2])
  local give_back = tonumber(ARGV[base + 3])
  local partial = ARGV[base + 4] == '1'
  local state = redis.call('HMGET', key, 'capacity', 'level', 'updated')
  local capacity, level, updated = tonumber(state[1]), tonumber(state[2]), tonumber(state[3])
  if capacity == nil or level == nil or updated == nil then
    capacity, level, updated = limit, limit, now
  end
  local function refill()
    if now > updated then
      level = math.min(capacity, level + (now - updated) * (capacity / window))
    end
    updated = math.max(updated, now)
  end
  if capacity ~= limit then
    refill()
    local spent = capacity - level
    capacity = limit
    level = math.max(0, capacity - spent)
  end
  refill()
  level = math.min(capacity, level + give_back)
  local taken = 0
  if amount <= level then
    taken = amount
  elseif partial then
    taken = math.max(0, level)
  end
  level = level - taken
  redis.call('HSET', key, 'capacity', fmt(capacity), 'level', fmt(level), 'updated', fmt(updated))
  redis.call('PEXPIRE', key, math.ceil((capacity - level) / (capacity / window) * 1000) + 1000)
  out[#out + 1] = fmt(taken)
  out[#out + 1] = fmt(level)
  out[#out + 1] = fmt(capacity)
end
return out
"""


@dataclass(frozen=True, slots=True)
class StoreAddress:
    """A checked redis:// URL; `shown` is what logs may print (no password)."""

    url: str
    shown: str


def parse_store_url(url: str) -> StoreAddress:
    """--rate-limit-store -> its address, or ConfigError in one line. Pure: Redis is not contacted."""
    expected = "expected redis://HOST[:PORT][/DB] (or rediss:// for TLS)"
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"--rate-limit-store {_masked(url)!r}: {exc}; {expected}") from None
    db = _DB.match(parts.path)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or db is None or parts.query:
        raise ConfigError(f"--rate-limit-store {_masked(url)!r}: {expected}")
    if port == 0:
        raise ConfigError(f"--rate-limit-store {_masked(url)!r}: port 0; {expected}")
    number = int(db.group(1) or 0)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    shown = f"{parts.scheme}://{host}:{port or 6379}/{number}"
    return StoreAddress(url=url.strip(), shown=shown)


def _masked(url: str) -> str:
    """A URL as a message may repeat it: its password (between ':' and '@') replaced."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def require_redis() -> ModuleType:
    """`redis.asyncio`, or ConfigError naming the extra that brings it."""
    try:
        return importlib.import_module("redis.asyncio")
    except ImportError:
        raise ConfigError(
            "--rate-limit-store names a Redis server, whose client is not installed: "
            "pip install 'embedserve[redis]'"
        ) from None


class RedisBuckets:
    """The buckets in the Redis at `address`. Every failure (refused, timed out, an error reply) is
    RateLimitStoreUnavailable; what to do then is failover.Failover's. `clock`: seconds to use instead
    of Redis's TIME (the tests' injected clock)."""

    def __init__(
        self, address: StoreAddress, *, timeout_s: float = TIMEOUT_S, clock: Callable[[], float] | None = None
    ) -> None:
        aioredis = require_redis()
        retry = importlib.import_module("redis.retry")
        backoff = importlib.import_module("redis.backoff")
        self.address = address
        self._timeout_s = timeout_s
        self._clock = clock
        # No retries inside the client: a script is not idempotent (a retry after a lost reply would
        # take twice), and the outage is the failover's to handle.
        self._client: Redis = aioredis.Redis.from_url(
            address.url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=retry.Retry(backoff.NoBackoff(), 0),
            health_check_interval=0,
        )
        self._script = self._client.register_script(TAKE_LUA)
        self._errors: tuple[type[BaseException], ...] = (
            importlib.import_module("redis.exceptions").RedisError,
            OSError,
            TimeoutError,
        )

    @property
    def where(self) -> str:
        return self.address.shown

    async def take(self, changes: Sequence[Take]) -> list[Level]:
        keys = [KEY_FORMAT.format(key_id=c.key_id, kind=c.kind) for c in changes]
        args: list[str] = ["" if self._clock is None else repr(self._clock()), repr(WINDOW_S)]
        for c in changes:
            args += [str(c.limit), repr(float(c.amount)), repr(float(c.give_back)), "1" if c.partial else "0"]
        reply = await self._call(self._script(keys=keys, args=args))
        values = [float(v) for v in reply]
        return [Level(*values[i : i + 3]) for i in range(0, len(values), 3)]

    async def ping(self) -> None:
        await self._call(self._client.ping())

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, call: Any) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s * 2):  # connect, then the call itself
                return await call
        except self._errors as exc:
            # Idle connections are as stale as this one (a restarted Redis closed them all): dropped,
            # so that the first calls after its return do not fail on them.
            with contextlib.suppress(*self._errors):
                await self._client.connection_pool.disconnect(inuse_connections=False)
            reason = str(exc) or type(exc).__name__
            raise RateLimitStoreUnavailable(
                f"the rate-limit store {self.address.shown} did not answer: {reason}"
            ) from exc
