"""Functions and views cached against the models they read, fresh when a row changes.

``@cached_as(Product)`` caches a function's result per arguments;
``@cached_view_as(Product)`` caches a view's responses per method, URL
(scheme, host, path, query string), language and time zone, and, when the
view depends on them, per client: a view that touches the session (which
``request.user`` does) is cached per session and user as Django validated
them (the session's key once loaded, the user's pk and session auth hash;
never the raw session cookie, so a logged-out, deleted, expired or forged
session never gets a stored page), one that renders a CSRF token per CSRF
cookie, one that sets ``Vary`` per the headers it names. Both are
invalidated by any committed change to a row of the models they depend on
(see :func:`ormbridge.cache.read_through`). The ``{% cached_as %}`` template
tag is in :mod:`ormbridge.templatetags.ormbridge`.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

from django.conf import settings
from django.db import models
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.utils.cache import patch_vary_headers
from django.utils.functional import LazyObject, empty
from django.utils.timezone import get_current_timezone_name
from django.utils.translation import get_language

from ormbridge import cache, keys

__all__ = [
    "COOKIE",
    "SESSION",
    "USER",
    "Source",
    "cached_as",
    "cached_view_as",
]

P = ParamSpec("P")
R = TypeVar("R")
V = TypeVar("V", bound=Callable[..., HttpResponseBase])

Source = type[models.Model] | models.QuerySet[Any]

# What a cached view varies on besides headers (":" is never in a header name): the session
# and its user as Django validated them, or a user that did not come from the session.
SESSION = ":session"
USER = ":user"
COOKIE = "cookie:"

_COMMAS = re.compile(r"\s*,\s*")


def cached_as(
    *sources: Source, timeout: int | None = None, key: str | Callable[..., str] | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Cache a function's result until a row of a model in ``sources`` changes.

    ``sources``: models and querysets (those the function reads: a queryset
    stands for every model it joins, filters on or prefetches); a registered
    model the function turns out to read besides them is added to its
    dependencies after its first call in a process (that call's result is
    not stored). The result is cached per arguments, positional and named
    apart, each encoded exactly by :func:`ormbridge.keys.encode` (numbers,
    strings, bytes, decimals, dates and times, UUIDs, containers of them,
    saved model instances by their label and pk, ...); the result must be
    picklable. ``timeout`` in seconds (``None``: the shortest of the models'
    cache timeouts).
    ``key``: a string names the function in the key instead of its module and
    qualified name (functions defined in a loop or a closure); a callable
    takes the function's arguments and returns the text that stands for them.

    Raises:
        TypeError: at decoration, a source is neither a model nor a queryset;
            at a call, an argument cannot be keyed (a request, a queryset, an
            arbitrary object: pass the values the result depends on instead,
            or give ``key``).
        LookupError: at a call, before anything is cached or run, a source
            reads a model that is not registered with ormbridge.
    """
    _check_sources("cached_as", sources)
    if key is not None and not isinstance(key, str) and not callable(key):
        raise TypeError(f"cached_as(key=...) takes a string or a callable, not {key!r}.")

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        name = key if isinstance(key, str) else f"{func.__module__}.{func.__qualname__}"

        @functools.wraps(func)
        def cached(*args: P.args, **kwargs: P.kwargs) -> R:
            labels = cache.dependencies(*sources)
            parts: tuple[object, ...]
            if callable(key):
                part = key(*args, **kwargs)
                if not isinstance(part, str):
                    raise TypeError(f"cached_as(key=...) returned {part!r}, not a string.")
                parts = ("func", name, "key", part)
            else:
                parts = ("func", name, args, tuple(sorted(kwargs.items())))
            try:
                return cache.read_through(
                    parts,
                    labels,
                    lambda: func(*args, **kwargs),
                    _timeout(timeout, labels),
                    shape=f"func\0{name}",
                )
            except keys.Unkeyable:
                _check_arguments(name, args, kwargs)  # names the argument, if it is one
                raise

        return cached

    return decorate


def cached_view_as(*sources: Source, timeout: int | None = None) -> Callable[[V], V]:
    """Cache a view's GET and HEAD responses until a row of a model in ``sources`` changes.

    The key is the method, the absolute URL with its query string, the active
    language and time zone, and what the view turned out to depend on, learnt
    from its first response per URL (like Django's cache middleware):

    - the session (touched by ``request.user``): the session and the user as
      Django validated them, never the raw session cookie. ``request.user`` is
      evaluated first (``django.contrib.auth.get_user`` flushes a session whose
      auth hash no longer matches its user's, after a password change), then
      the session's key once loaded (none for a cookie that names no live
      session: logged out, deleted, expired or never issued) and the user's
      model, pk and session auth hash (or none: anonymous, inactive). Two
      sessions never share an entry, and a dead session gets the page of a
      client without one. So a hit for such a page costs the session's and
      the user's queries (none without a session cookie); the response gets
      ``Vary: Cookie``;
    - a user that did not come from the session (an API token's): its model,
      pk and session auth hash;
    - a CSRF token in the page: the CSRF cookie;
    - the headers the response names in ``Vary`` (set by ``@vary_on_headers``
      or ``@vary_on_cookie`` placed *below* this decorator).

    Only rendered (a ``TemplateResponse`` is rendered here) 200 responses are
    cached, and not those that are streaming, set cookies (through
    ``response.cookies`` or a ``Set-Cookie`` header set by hand), say
    ``Cache-Control: private`` or ``no-store`` or ``Vary: *``, wrote to the
    session, issued a new CSRF cookie, or showed or added messages. A view
    must not read a cookie or header other than through the session or CSRF
    token unless it says so with ``Vary``. For sync function views (a
    class-based view through ``method_decorator``).

    Raises:
        TypeError: at decoration, a source is neither a model nor a queryset,
            or the view is async.
        LookupError: at a request, before the view runs, a source reads a
            model that is not registered with ormbridge.
    """
    _check_sources("cached_view_as", sources)

    def decorate(view: V) -> V:
        if inspect.iscoroutinefunction(view):
            raise TypeError(f"cached_view_as(): {view.__qualname__} is async; sync views only.")
        owner = getattr(view, "view_class", None)  # as_view() functions share one qualname
        name = f"{view.__module__}.{(owner or view).__qualname__}"

        @functools.wraps(view)
        def cached(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            if request.method not in ("GET", "HEAD"):
                return view(request, *args, **kwargs)
            labels = cache.dependencies(*sources)
            seconds = _timeout(timeout, labels)
            base = (
                "view",
                name,
                request.method,
                request.build_absolute_uri(),
                get_language() or "",
                get_current_timezone_name(),
            )
            first: list[HttpResponseBase] = []

            def learn() -> list[str]:
                response, varies_on = _respond(view, request, args, kwargs)
                first.append(response)
                return varies_on

            def load() -> HttpResponseBase:
                if first:
                    return first[0]
                response, varies_on = _respond(view, request, args, kwargs)
                if not set(varies_on) <= set(learnt):
                    # It depends on more than its URL's entries are keyed by: not storable
                    # under them until they are invalidated or expire.
                    raise _NotCacheable(response)
                return response

            shape = f"view\0{name}"
            try:
                learnt = cache.read_through((*base, "vary"), labels, learn, seconds, shape=shape)
                values = [_value(request, item) for item in learnt]
                return cache.read_through(
                    (*base, "page", learnt, values), labels, load, seconds, shape=shape
                )
            except _NotCacheable as refused:
                return refused.response

        return cast(V, cached)

    return decorate


class _NotCacheable(Exception):
    """Raised by a load to hand back a response without storing it."""

    def __init__(self, response: HttpResponseBase) -> None:
        super().__init__()
        self.response = response


def _check_sources(what: str, sources: tuple[Any, ...]) -> None:
    if not sources:
        raise TypeError(f"{what}() needs the models or querysets the result depends on.")
    for source in sources:
        is_model = isinstance(source, type) and issubclass(source, models.Model)
        if not is_model and not isinstance(source, models.QuerySet):
            raise TypeError(
                f"{what}() caches against models and querysets, not {source!r} "
                f"({type(source).__name__})."
            )


def _timeout(timeout: int | None, labels: list[str]) -> int | None:
    return cache.default_timeout(labels) if timeout is None else timeout


def _check_arguments(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse, naming it, an argument :func:`ormbridge.keys.encode` cannot key."""
    for where, value in [*enumerate(args, 1), *kwargs.items()]:
        try:
            keys.encode(value)
        except keys.Unkeyable as exc:
            what = f"argument {where}" if isinstance(where, int) else f"argument {where}="
            hint = (
                "request.user.pk, request.GET values"
                if isinstance(value, HttpRequest)
                else "the values the result depends on"
            )
            raise TypeError(
                f"cached_as {name}: {what} is a {type(value).__name__}, which has no exact "
                f"key ({exc}). Pass {hint} instead, or give cached_as a key= callable."
            ) from None


def _respond(
    view: Callable[..., HttpResponseBase],
    request: HttpRequest,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[HttpResponseBase, list[str]]:
    """The view's rendered response and what it varies on; ``_NotCacheable`` if not storable."""
    response = view(request, *args, **kwargs)
    render = getattr(response, "render", None)
    if callable(render):
        response = render()  # its content and what rendering touched (request.user) count
    varies_on = _varies_on(request, response)
    if SESSION in varies_on:
        # Validated now if the view did not: a session Django flushes for its user (the view
        # saw its data) is modified, so not stored under the key of a client without one.
        _identity(request, session=True)
    if not _storable(request, response):
        raise _NotCacheable(response)
    if SESSION in varies_on or any(item.startswith(COOKIE) for item in varies_on):
        patch_vary_headers(response, ["Cookie"])  # also on hits, for HTTP caches downstream
    return response, varies_on


def _storable(request: HttpRequest, response: HttpResponseBase) -> bool:
    if response.streaming or response.status_code != 200 or response.cookies:
        return False
    if response.has_header("Set-Cookie"):
        return False  # set by hand (header names are case-insensitive): for this client only
    control = {
        d.split("=")[0].strip().lower() for d in _COMMAS.split(response.get("Cache-Control", ""))
    }
    if control & {"private", "no-store"} or "*" in _vary_headers(response):
        return False
    session = getattr(request, "session", None)
    if session is not None and session.modified:
        return False  # it will set a cookie, and the page shows state no model holds
    if request.META.get("CSRF_COOKIE_NEEDS_UPDATE") and (
        request.META.get("CSRF_COOKIE") != _csrf_secret_sent(request)
    ):
        return False  # the page holds a CSRF secret issued to this client only, not yet sent
    messages = getattr(request, "_messages", None)
    return messages is None or not (messages.added_new or (messages.used and len(messages)))


def _csrf_secret_sent(request: HttpRequest) -> str | None:
    """The CSRF secret the client sent (in its cookie, or its session's)."""
    if settings.CSRF_USE_SESSIONS:
        from django.middleware.csrf import CSRF_SESSION_KEY

        session = getattr(request, "session", None)
        return None if session is None else session.get(CSRF_SESSION_KEY)
    return request.COOKIES.get(settings.CSRF_COOKIE_NAME)


def _varies_on(request: HttpRequest, response: HttpResponseBase) -> list[str]:
    """Sorted items the response depends on: header names, ``cookie:<name>``, ``:session``
    (whose value names the user too, whatever set ``request.user``) or ``:user``."""
    items = set(_vary_headers(response))
    session = getattr(request, "session", None)
    if session is not None and session.accessed:
        items.add(SESSION)
    elif _user_loaded(request):
        items.add(USER)
    if request.META.get("CSRF_COOKIE_NEEDS_UPDATE") and not settings.CSRF_USE_SESSIONS:
        items.add(COOKIE + settings.CSRF_COOKIE_NAME)
    return sorted(items)


def _vary_headers(response: HttpResponseBase) -> list[str]:
    return [h.strip().lower() for h in _COMMAS.split(response.get("Vary", "")) if h.strip()]


def _user_loaded(request: HttpRequest) -> bool:
    """Whether the view read ``request.user`` (AuthenticationMiddleware's is lazy)."""
    user = request.__dict__.get("user")
    if isinstance(user, LazyObject):
        return user._wrapped is not empty
    return user is not None


def _value(request: HttpRequest, item: str) -> str | None:
    """The request's value of one thing a response varies on."""
    if item in (SESSION, USER):
        return _identity(request, session=item == SESSION)
    if item.startswith(COOKIE):
        return request.COOKIES.get(item[len(COOKIE) :])
    return request.headers.get(item)


def _identity(request: HttpRequest, *, session: bool) -> str:
    """Who the request is once Django has validated it, as unambiguous text (JSON).

    ``request.user`` is evaluated first: AuthenticationMiddleware's lazy user is
    ``django.contrib.auth.get_user``'s, which checks the session's auth hash and
    flushes a session whose hash no longer matches (a changed password), and is
    anonymous for an inactive user or a session without one. The user is its
    model, pk and session auth hash, or ``None``. With ``session``, the session's
    key once it has loaded: ``None`` for a cookie that names no live session
    (logged out, deleted, expired, never issued), never the cookie's text.
    """
    user = getattr(request, "user", None)
    who: list[str] | None = None
    if user is not None and user.is_authenticated:
        auth_hash = getattr(user, "get_session_auth_hash", None)
        who = [
            user._meta.label_lower,
            user._meta.pk.value_to_string(user),
            auth_hash() if callable(auth_hash) else "",
        ]
    if not session:
        return json.dumps(["user", who])
    store = request.session
    store.keys()  # loads it (get_user did, if it ran): a missing session's key becomes None
    return json.dumps(["session", store.session_key, who])
