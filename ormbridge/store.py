"""ormbridge's Redis: the client, the key layout and the server-side scripts.

Every key is built here, under ``ORMBRIDGE["KEY_PREFIX"]``. Per model
(``label`` is ``app_label.modelname``):

``{prefix}:{label}:pending``          set of ``"<action>:<pk>"`` waiting for a flush
``{prefix}:{label}:fields``           changed field names of pending updates (``*`` = all)
``{prefix}:{label}:scheduled``        debounce guard: a flush task is on its way
``{prefix}:{label}:inflight:<id>``    a pending set taken over by a running flush
``{prefix}:{label}:tok:<pk>``         token of a cached instance (deleted on change)
``{prefix}:{label}:epoch``            token of all cached instances of the model
``{prefix}:{label}:gen``              token of all cached querysets reading the model
``{prefix}:{label}:stats``            counters for status and the demo
``{prefix}:inflight``                 sorted set of in-flight sets by start time
"""

from __future__ import annotations

import functools

import redis

from ormbridge.conf import settings

ACTIONS = {"c": "create", "u": "update", "d": "delete", "i": "invalidate"}
ALL = "*"  # a pending member or field meaning "everything of the model"


def get_redis() -> redis.Redis:
    """The client for ``ORMBRIDGE["REDIS_URL"]``, shared per URL."""
    return _client(settings.REDIS_URL)


@functools.lru_cache(maxsize=8)
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_connect_timeout=2, socket_timeout=5, decode_responses=True
    )


def key(*parts: object) -> str:
    return ":".join([settings.KEY_PREFIX, *map(str, parts)])


def pending_key(label: str) -> str:
    return key(label, "pending")


def fields_key(label: str) -> str:
    return key(label, "fields")


def scheduled_key(label: str) -> str:
    return key(label, "scheduled")


def inflight_key(label: str, flush_id: str) -> str:
    return key(label, "inflight", flush_id)


def inflight_index_key() -> str:
    return key("inflight")


def token_key(label: str, pk: object) -> str:
    return key(label, "tok", pk)


def epoch_key(label: str) -> str:
    return key(label, "epoch")


def generation_key(label: str) -> str:
    return key(label, "gen")


def stats_key(label: str) -> str:
    return key(label, "stats")


def member(action: str, pk: object) -> str:
    return f"{action}:{pk}"


def parse_member(value: str) -> tuple[str, str]:
    """Split a pending member into ``(action, pk-as-text)``; ``ALL`` is ``("i", "*")``."""
    if value == ALL:
        return "i", ALL
    action, _, pk = value.partition(":")
    return action, pk


# KEYS: pending, fields, scheduled, inflight, inflight fields, inflight index.
# ARGV: now. Releases the guard and takes the pending set over in one step, so
# a change landing after it schedules a new flush (no lost wake-up) and a
# change landing before it is in the taken-over set.
DRAIN = """
redis.call('DEL', KEYS[3])
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('RENAME', KEYS[1], KEYS[4])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('RENAME', KEYS[2], KEYS[5])
end
redis.call('ZADD', KEYS[6], ARGV[1], KEYS[4])
return 1
"""

# KEYS: pending, fields, inflight, inflight fields, inflight index. Puts an
# abandoned in-flight set back into the pending set.
RESTORE = """
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('SUNIONSTORE', KEYS[1], KEYS[1], KEYS[3])
  redis.call('SUNIONSTORE', KEYS[2], KEYS[2], KEYS[4])
  redis.call('DEL', KEYS[3], KEYS[4])
end
redis.call('ZREM', KEYS[5], KEYS[3])
return redis.call('SCARD', KEYS[1])
"""

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


def script(source: str) -> redis.commands.core.Script:
    """A registered script on the current client (cached per client and source)."""
    return _script(get_redis(), source)


@functools.lru_cache(maxsize=32)
def _script(client: redis.Redis, source: str) -> redis.commands.core.Script:
    return client.register_script(source)
