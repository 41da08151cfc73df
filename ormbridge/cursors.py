"""The events endpoint's cursors: every subscribed namespace's stream position in one id.

A cursor is the URL-safe base64 (unpadded) of the JSON object
``{"namespace": "ms-seq", ...}``: the ``id:`` of each message the endpoint sends
and the ``Last-Event-ID`` a reconnecting client sends back. :func:`decode_cursor`
accepts only what :func:`encode_cursor` could have issued (bounded length, stream ids
of two numbers below 2**64, valid namespaces) and raises
:class:`ormbridge.access.BadRequest` for anything else.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
from typing import Any, cast

from ormbridge.access import MAX_NAMESPACE_LENGTH, BadRequest, is_namespace
from ormbridge.conf import settings

__all__ = ["decode_cursor", "encode_cursor", "max_cursor_length"]


_STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_MAX_STREAM_ID_PART = 2**64 - 1  # Redis stream ids are two unsigned 64-bit numbers
# An encoded cursor entry at most: "namespace":"ms-seq",
_MAX_CURSOR_ENTRY = len('"":"-",') + MAX_NAMESPACE_LENGTH + 2 * 20


def encode_cursor(positions: dict[str, str]) -> str:
    """The cursor of ``positions`` (namespace -> stream entry id)."""
    return _encode_cursor(tuple(positions.items()))


@functools.lru_cache(maxsize=1024)
def _encode_cursor(positions: tuple[tuple[str, str], ...]) -> str:
    """Cached: the streams of a process that follow the same namespaces are at the
    same positions after each event, and each needs the same cursor."""
    raw = json.dumps(dict(positions), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def max_cursor_length() -> int:
    """The longest cursor the endpoint issues: ``EVENTS_MAX_NAMESPACES`` entries at most."""
    raw = 2 + int(settings.EVENTS_MAX_NAMESPACES) * _MAX_CURSOR_ENTRY
    return 4 * math.ceil(raw / 3)


def decode_cursor(value: str) -> dict[str, str]:
    """Stream positions from a ``Last-Event-ID``; "" means from now.

    Raises :class:`BadRequest` for anything the endpoint would not have issued.
    """
    if not value:
        return {}
    limit = max_cursor_length()
    if len(value) > limit:
        raise BadRequest(f"Last-Event-ID is longer than the {limit} characters of a cursor")
    unreadable = BadRequest("Last-Event-ID is not a cursor of this endpoint")
    if not _BASE64URL.fullmatch(value):
        raise unreadable
    try:
        positions: Any = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        raise unreadable from None
    if not isinstance(positions, dict):
        raise unreadable
    for namespace, position in positions.items():
        if not (isinstance(position, str) and _is_stream_id(position) and is_namespace(namespace)):
            raise BadRequest(
                "Last-Event-ID holds a position that is not a stream id (ms-seq, two "
                "numbers below 2**64) or a namespace that is not valid"
            )
    return cast(dict[str, str], positions)


def _is_stream_id(value: str) -> bool:
    match = _STREAM_ID.fullmatch(value)
    return match is not None and all(int(part) <= _MAX_STREAM_ID_PART for part in match.groups())
