"""Synchronous delivery: the one door from the write side into the delivery side.

The write side (capture, commit, bulk, resync, the invalidate command) hands its
changes to the delivery side (relay, replay, delivery, broadcast, fanout) through
the change log alone: it writes rows, a relay claims and delivers them. Two callers
deliver their own rows in their own process instead, and do so here:

- ``safe_bulk_*(..., replay="sync")`` writes each chunk's rows claimed by an owner
  (:func:`new_owner`) and, once the chunk commits, delivers them with
  :func:`deliver_held`;
- ``ormbridge_resync --sync`` (``resync.run(..., sync=True)``) takes each chunk's row
  under its owner and delivers it with :func:`deliver_held`.

Nothing else on the write side imports the delivery side: the import contract in
``pyproject.toml`` checks it (docs/design.md, "Two sides, one door").
"""

from __future__ import annotations

from collections.abc import Iterable

from ormbridge import relay
from ormbridge.relay import DrainResult

__all__ = ["DrainResult", "deliver_held", "new_owner"]


def new_owner() -> str:
    """A new lease owner (host, process, random part): the rows a caller writes or takes
    claimed under it are its own to deliver, and no relay takes them while their
    lease lasts."""
    return relay.new_owner()


def deliver_held(ids: Iterable[int], using: str, owner: str) -> DrainResult:
    """Deliver now, in this process, the change-log rows ``ids`` of database ``using``
    that ``owner`` holds, renewing their leases while it works; a row a relay took
    over meanwhile is left to it. What was delivered, failed or left is in the
    result (see :func:`ormbridge.relay.deliver_held`)."""
    return relay.deliver_held(ids, using, owner)
