"""ormbridge's Redis: the clients, the key layout and the server-side scripts.

Redis is a cache of the change log (the database is the truth): it may be
emptied, restored or failed over at any time. Every key is built here, under
``ORMBRIDGE["KEY_PREFIX"]``. Per model (``label`` is ``app_label.modelname``):

``{prefix}:{label}:obj:<pk>``         cached instance: its tokens' stamp, then a pickle
``{prefix}:entry:<sha256>``           cached queryset, value or fragment, the same way
``{prefix}:{label}:tok:<pk>``         token of a cached instance (deleted on change)
``{prefix}:{label}:epoch``            token of all cached instances of the model
``{prefix}:{label}:gen``              token of all cached querysets reading the model
``{prefix}:{label}:stats``            counters for status and the demo
``{prefix}:{label}:namespaces``       each row's last event namespaces
``{prefix}:events:<namespace>``       stream of a namespace's events
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

import redis
from redis.connection import AbstractConnection

from ormbridge.conf import settings

logger = logging.getLogger("ormbridge")


class Client(redis.Redis):
    """A redis-py client that knows which incarnation of the server it talks to.

    ``run_id`` is read from ``INFO server`` on every new connection: a restart
    (with or without a restored snapshot) or a failover to another server
    changes it, and every connection to the old server is gone by then.
    """

    run_id: str = ""


def get_redis() -> Client:
    """The client for ``ORMBRIDGE["REDIS_URL"]``, shared per URL."""
    return _client(settings.REDIS_URL, 2.0, 5.0)


def entries_redis() -> Client:
    """A client of the same server that answers bytes: cache entries hold pickles."""
    return _client(settings.REDIS_URL, 2.0, 5.0, decode=False)


def commit_redis() -> Client:
    """The client of the commit path: timeouts of ``COMMIT_TIMEOUT`` seconds."""
    timeout = float(settings.COMMIT_TIMEOUT)
    return _client(settings.REDIS_URL, timeout, timeout)


@functools.lru_cache(maxsize=8)
def _client(url: str, connect_timeout: float, timeout: float, decode: bool = True) -> Client:
    holder: list[Client] = []

    def on_connect(connection: AbstractConnection) -> None:
        connection.on_connect()  # type: ignore[no-untyped-call]  # unannotated in redis-py
        connection.send_command("INFO", "server")  # type: ignore[no-untyped-call]  # same
        info = connection.read_response()
        text = info.decode() if isinstance(info, bytes) else str(info)  # INFO is text
        for line in text.splitlines():
            if line.startswith("run_id:"):
                holder[0].run_id = line.partition(":")[2].strip()

    # redis-py annotates from_url as -> "Redis" but returns cls(...), here a Client.
    client: Client = Client.from_url(  # type: ignore[assignment]
        url,
        socket_connect_timeout=connect_timeout,
        socket_timeout=timeout,
        decode_responses=decode,
        redis_connect_func=on_connect,
    )
    holder.append(client)
    return client


def incarnation(client: Client | None = None) -> str:
    """The run id of the server ``client`` (``get_redis()``) talks to; connects if needed."""
    client = client or get_redis()
    if not client.run_id:
        client.ping()
    return client.run_id


class Breaker:
    """Skips Redis for ``BREAKER_COOLDOWN`` seconds after a failure on the commit path.

    A hung or dead Redis then costs one commit ``COMMIT_TIMEOUT`` at most and
    later commits nothing, until a commit after the cool-down tries again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open_until = 0.0

    @property
    def open(self) -> bool:
        return time.monotonic() < self._open_until

    def trip(self, error: BaseException) -> None:
        with self._lock:
            if not self.open:
                logger.warning(
                    "ormbridge: Redis failed at commit (%s); commits skip it for %s s, "
                    "the relay delivers their changes from the change log",
                    error,
                    settings.BREAKER_COOLDOWN,
                )
            self._open_until = time.monotonic() + float(settings.BREAKER_COOLDOWN)

    def reset(self) -> None:
        with self._lock:
            self._open_until = 0.0


breaker = Breaker()


def key(*parts: object) -> str:
    return ":".join([settings.KEY_PREFIX, *map(str, parts)])


def token_key(label: str, pk: object) -> str:
    return key(label, "tok", pk)


def epoch_key(label: str) -> str:
    return key(label, "epoch")


def generation_key(label: str) -> str:
    return key(label, "gen")


def stats_key(label: str) -> str:
    return key(label, "stats")


# KEYS: token keys. ARGV: nonce, ttl (0 = none). Returns each key's token,
# creating missing ones; existing tokens have their ttl refreshed.
ENSURE_TOKENS = """
local ttl = tonumber(ARGV[2])
local out = {}
for i, k in ipairs(KEYS) do
  local v
  if ttl > 0 then
    v = redis.call('GETEX', k, 'EX', ttl)
  else
    v = redis.call('GET', k)
  end
  if not v then
    v = ARGV[1] .. '.' .. i
    if ttl > 0 then
      redis.call('SET', k, v, 'EX', ttl)
    else
      redis.call('SET', k, v)
    end
  end
  out[i] = v
end
return out
"""


# KEYS: the entry, then ARGV[4] stats hashes, then the entry's token keys.
# ARGV: nonce, token ttl (0 = none), the server's run id, number of stats hashes.
# Ensures the tokens like ENSURE_TOKENS; the entry is a hit when it starts with
# their stamp (run id and tokens). Counts the hit or miss. Returns {1, pickle}
# on a hit, {0, stamp} on a miss: the stamp to store the loaded value under.
READ_ENTRY = """
local ttl = tonumber(ARGV[2])
local stats = tonumber(ARGV[4])
local parts = {ARGV[3]}
for i = 2 + stats, #KEYS do
  local k = KEYS[i]
  local v
  if ttl > 0 then
    v = redis.call('GETEX', k, 'EX', ttl)
  else
    v = redis.call('GET', k)
  end
  if not v then
    v = ARGV[1] .. '.' .. i
    if ttl > 0 then
      redis.call('SET', k, v, 'EX', ttl)
    else
      redis.call('SET', k, v)
    end
  end
  parts[#parts + 1] = v
end
local stamp = table.concat(parts, ' ') .. '\\n'
local entry = redis.call('GET', KEYS[1])
local hit = entry and string.sub(entry, 1, #stamp) == stamp
for i = 2, 1 + stats do
  redis.call('HINCRBY', KEYS[i], hit and 'hits' or 'misses', 1)
end
if hit then
  return {1, string.sub(entry, #stamp + 1)}
end
return {0, stamp}
"""

# KEYS: the entry, then ARGV[6] token keys, then stats hashes.
# ARGV: the stamp the value was loaded under, the stamp and the pickle, the
# timeout (0 = none), the tokens' ttl (0 = none), the server's run id, the
# number of token keys. Stores only if the tokens still make that stamp (no
# invalidation since the read), and keeps them at least as long as the entry.
STORE_ENTRY = """
local tokens = tonumber(ARGV[6])
local parts = {ARGV[5]}
for i = 2, 1 + tokens do
  local v = redis.call('GET', KEYS[i])
  if not v then
    return 0
  end
  parts[#parts + 1] = v
end
if table.concat(parts, ' ') .. '\\n' ~= ARGV[1] then
  return 0
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
local ttl = tonumber(ARGV[4])
for i = 2, 1 + tokens do
  local left = redis.call('TTL', KEYS[i])
  if ttl == 0 then
    redis.call('PERSIST', KEYS[i])
  elseif left >= 0 and left < ttl then
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
for i = 2 + tokens, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'stores', 1)
end
return 1
"""


def script(source: str, client: Client | None = None) -> Any:
    """A registered script on ``client`` (``get_redis()``), cached per client and source."""
    return _script(client or get_redis(), source)


@functools.lru_cache(maxsize=32)
def _script(client: redis.Redis, source: str) -> Any:
    return client.register_script(source)
