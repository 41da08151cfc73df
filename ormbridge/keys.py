"""Cache keys: one canonical, type-tagged encoding of the values a cached read depends on.

Two reads share a cache entry only when everything that decides their result
encodes to the same bytes. ``repr()`` cannot be that encoding: psycopg cuts
the repr of a ``Jsonb`` or ``Binary`` parameter after ~35 characters, an
expression's or a memoryview's default repr holds a memory address that
CPython hands to the next object, and ``repr(('p:', 'q'))`` style joins are
ambiguous. :func:`encode` is total over the types below and refuses every
other one with :class:`Unkeyable`, naming it; it never falls back to a repr.

Every value is written as a one-byte tag, then either a length-prefixed
payload (atoms) or a count and its items (containers), so no two different
values, nor a value and a sequence of values, encode alike:

- ``None``, ``bool``, ``int``, ``float``, ``str``, bytes-like (``bytes``,
  ``bytearray``, ``memoryview``), ``Decimal`` (its exact digits: ``1.0`` and
  ``1.00`` differ), ``datetime``/``date``/``time`` (ISO 8601 with the UTC
  offset, so a naive and an aware value differ), ``timedelta``, ``UUID``,
  ``ipaddress`` addresses and networks;
- ``list``, ``tuple`` (tagged apart), ``dict`` (in its own order: two equal
  dicts in different orders get two entries, never one wrong one), ``set``
  and ``frozenset`` (sorted by their items' encodings);
- enum members (their class and value), model instances (their model's label
  and pk; an unsaved one has no key);
- the adapters database drivers receive as query parameters: psycopg's
  ``Jsonb``/``Json`` (the JSON text they send), ``Binary`` and ranges, and
  psycopg2's ``Json`` and ranges.

Subclasses of the scalar types (``SafeString``, a ``datetime`` subclass)
encode as their base: a driver sends them as such.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import hashlib
import ipaddress
import json
import uuid
from collections.abc import Callable
from typing import Any

from django.db import models

__all__ = ["Unkeyable", "digest", "encode"]


class Unkeyable(TypeError):
    """A value :func:`encode` has no exact encoding for; ``type_name`` names its type."""

    def __init__(self, value: object, path: str = "") -> None:
        self.type_name = f"{type(value).__module__}.{type(value).__qualname__}"
        self.path = path
        where = f" at {path}" if path else ""
        super().__init__(
            f"ormbridge cannot key a {self.type_name} value{where}: it has no exact encoding "
            "(supported: None, bool, int, float, str, bytes, Decimal, date/time values, "
            "UUID, IP addresses, lists, tuples, dicts, sets, enums, saved model instances "
            "and JSON, binary and range query parameters)."
        )


def encode(value: object) -> bytes:
    """``value``'s canonical encoding. Raises :class:`Unkeyable` for a type it does not know."""
    out = bytearray()
    _encode(value, out, "")
    return bytes(out)


def digest(*values: object) -> str:
    """The SHA-256 hex digest of ``values``' encoding (a tuple of them)."""
    return hashlib.sha256(encode(values)).hexdigest()


def _atom(out: bytearray, tag: bytes, payload: bytes) -> None:
    out += tag
    out += str(len(payload)).encode()
    out += b":"
    out += payload


def _utf8(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def _encode(value: object, out: bytearray, path: str) -> None:
    kind = type(value)
    encoder = _BY_TYPE.get(kind)
    if encoder is None:
        encoder = _encoder_for(value)
        if encoder is None:
            raise Unkeyable(value, path)
    encoder(value, out, path)


def _encoder_for(value: object) -> Callable[[Any, bytearray, str], None] | None:
    """The encoder of a type that is not one of ``_BY_TYPE``'s own: an enum member, a
    model instance, a driver's adapter, or a subclass of a scalar type."""
    if isinstance(value, enum.Enum):
        return _enum
    if isinstance(value, models.Model):
        return _model
    kind = type(value)
    for base in kind.__mro__:
        name = f"{base.__module__}.{base.__qualname__}"
        if name in _ADAPTERS:
            return _ADAPTERS[name]
    for base in kind.__mro__[1:]:
        if base in _SCALARS:
            return _BY_TYPE[base]
    return None


def _none(value: None, out: bytearray, path: str) -> None:
    out += b"N"


def _bool(value: bool, out: bytearray, path: str) -> None:
    out += b"T" if value else b"F"


def _int(value: int, out: bytearray, path: str) -> None:
    _atom(out, b"i", str(int(value)).encode())


def _float(value: float, out: bytearray, path: str) -> None:
    _atom(out, b"f", float.__repr__(value).encode())  # repr round-trips every float


def _str(value: str, out: bytearray, path: str) -> None:
    _atom(out, b"s", _utf8(str.__str__(value)))


def _bytes(value: bytes | bytearray | memoryview, out: bytearray, path: str) -> None:
    _atom(out, b"b", bytes(value))


def _decimal(value: decimal.Decimal, out: bytearray, path: str) -> None:
    _atom(out, b"d", decimal.Decimal.__str__(value).encode())


def _datetime(value: datetime.datetime, out: bytearray, path: str) -> None:
    _atom(out, b"D", datetime.datetime.isoformat(value).encode())


def _date(value: datetime.date, out: bytearray, path: str) -> None:
    _atom(out, b"a", datetime.date.isoformat(value).encode())


def _time(value: datetime.time, out: bytearray, path: str) -> None:
    _atom(out, b"h", datetime.time.isoformat(value).encode())


def _timedelta(value: datetime.timedelta, out: bytearray, path: str) -> None:
    _atom(out, b"e", f"{value.days},{value.seconds},{value.microseconds}".encode())


def _uuid(value: uuid.UUID, out: bytearray, path: str) -> None:
    _atom(out, b"u", value.bytes)


def _ip(value: object, out: bytearray, path: str) -> None:
    _atom(out, b"p", _utf8(f"{type(value).__name__} {value}"))


def _sequence(tag: bytes) -> Callable[[Any, bytearray, str], None]:
    def encode_items(value: list[Any] | tuple[Any, ...], out: bytearray, path: str) -> None:
        out += tag
        out += str(len(value)).encode()
        out += b":"
        for index, item in enumerate(value):
            _encode(item, out, f"{path}[{index}]")

    return encode_items


def _dict(value: dict[Any, Any], out: bytearray, path: str) -> None:
    out += b"m"
    out += str(len(value)).encode()
    out += b":"
    for key, item in value.items():
        _encode(key, out, f"{path}.key")
        _encode(item, out, f"{path}[{key!r}]" if isinstance(key, str | int) else f"{path}[]")


def _set(value: set[Any] | frozenset[Any], out: bytearray, path: str) -> None:
    items = sorted(_encode_at(item, f"{path}{{}}") for item in value)
    out += b"S"
    out += str(len(items)).encode()
    out += b":"
    for item in items:
        out += item


def _encode_at(value: object, path: str) -> bytes:
    out = bytearray()
    _encode(value, out, path)
    return bytes(out)


def _enum(value: enum.Enum, out: bytearray, path: str) -> None:
    kind = type(value)
    _atom(out, b"E", _utf8(f"{kind.__module__}.{kind.__qualname__}"))
    _encode(value.value, out, f"{path}.value")


def _model(value: models.Model, out: bytearray, path: str) -> None:
    if value.pk is None:
        raise Unkeyable(value, path or "an unsaved model instance")
    _atom(out, b"M", _utf8(value._meta.label_lower))
    _encode(value.pk, out, f"{path}.pk")


def _json(value: Any, out: bytearray, path: str) -> None:
    """psycopg's ``Jsonb``/``Json``: the JSON text the driver will send, exactly."""
    try:
        text = (value.dumps or json.dumps)(value.obj)
    except (TypeError, ValueError):
        raise Unkeyable(value.obj, path) from None
    payload = text if isinstance(text, bytes) else _utf8(text)
    _atom(out, b"J", _utf8(f"{type(value).__name__}:") + payload)


def _psycopg2_json(value: Any, out: bytearray, path: str) -> None:
    try:
        text = value.dumps(value.adapted)
    except (TypeError, ValueError):
        raise Unkeyable(value.adapted, path) from None
    _atom(out, b"J", _utf8(f"psycopg2:{text}"))


def _binary(value: Any, out: bytearray, path: str) -> None:
    _atom(out, b"b", bytes(value.obj))


def _range(value: Any, out: bytearray, path: str) -> None:
    """A range parameter: its bounds and their inclusivity (empty ranges alike)."""
    out += b"R"
    _encode(bool(value.isempty), out, path)
    _encode(value.lower, out, f"{path}.lower")
    _encode(value.upper, out, f"{path}.upper")
    _encode(getattr(value, "_bounds", None), out, f"{path}.bounds")


_BY_TYPE: dict[type, Callable[[Any, bytearray, str], None]] = {
    type(None): _none,
    bool: _bool,
    int: _int,
    float: _float,
    str: _str,
    bytes: _bytes,
    bytearray: _bytes,
    memoryview: _bytes,
    decimal.Decimal: _decimal,
    datetime.datetime: _datetime,
    datetime.date: _date,
    datetime.time: _time,
    datetime.timedelta: _timedelta,
    uuid.UUID: _uuid,
    ipaddress.IPv4Address: _ip,
    ipaddress.IPv6Address: _ip,
    ipaddress.IPv4Network: _ip,
    ipaddress.IPv6Network: _ip,
    ipaddress.IPv4Interface: _ip,
    ipaddress.IPv6Interface: _ip,
    list: _sequence(b"l"),
    tuple: _sequence(b"t"),
    dict: _dict,
    set: _set,
    frozenset: _set,
}

# Types whose subclasses a driver sends as the type itself (bool is an int subclass with
# an encoder of its own; datetime a date subclass, checked first through the MRO).
_SCALARS = frozenset({int, float, str, bytes, decimal.Decimal, datetime.datetime, datetime.date})

# Drivers' parameter adapters, by the qualified name of their class (no driver is imported).
_ADAPTERS: dict[str, Callable[[Any, bytearray, str], None]] = {
    "psycopg.types.json._JsonWrapper": _json,
    "psycopg.dbapi20.Binary": _binary,
    "psycopg.types.range.Range": _range,
    "psycopg2._json.Json": _psycopg2_json,
    "psycopg2._range.Range": _range,
}
