"""Who may see which change events: the one access rule for every way events leave ormbridge.

The events endpoint (:mod:`ormbridge.views`), the Channels consumer
(:mod:`ormbridge.contrib.channels`) and the django-eventstream channel manager
(:mod:`ormbridge.contrib.eventstream`) all check access here:

- :func:`requested_namespaces` and :func:`is_namespace`: what a client may ask for
  (``app_label.model`` or ``app_label.model::name``, bounded; ``::`` is
  :data:`SEPARATOR`), :class:`BadRequest` otherwise;
- :func:`permission`: the ``EVENTS_PERMISSION`` hook, else :func:`may_subscribe`
  (the user may ``view`` the namespace's model; tenant namespaces refused);
- :func:`authorize`: whether the user is logged in, and which namespaces they may and
  may not see, with ``reload`` the session and the user read again first
  (:func:`reload_user`: an open stream's or socket's re-check).

Public for integrations: ``ormbridge.contrib`` imports only this module, the
``ormbridge`` package's exports (``Emitter``, ``Event``) and ``ormbridge.conf``, as a
project's own transport may (the import contract in ``pyproject.toml`` checks contrib).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib import import_module
from typing import cast

from django.conf import settings as django_settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
    load_backend,
)
from django.core.exceptions import TooManyFieldsSent
from django.http import HttpRequest
from django.utils.crypto import constant_time_compare
from django.utils.module_loading import import_string

from ormbridge import registry
from ormbridge.broadcast import SEPARATOR
from ormbridge.conf import settings

__all__ = [
    "MAX_NAMESPACE_LENGTH",
    "SEPARATOR",
    "BadRequest",
    "authorize",
    "is_namespace",
    "may_subscribe",
    "permission",
    "reload_user",
    "requested_namespaces",
]


MAX_NAMESPACE_LENGTH = 200

# app_label.model, optionally ::name; printable ASCII without spaces, quotes or
# backslashes, so a namespace needs no escaping in a cursor and bounds its size.
_NAMESPACE = re.compile(r"[A-Za-z0-9_]+\.[A-Za-z0-9_]+(?:::[!#-\[\]-~]+)?")


class BadRequest(ValueError):
    """Input the endpoint refuses with a 400; the message never contains the input."""


def is_namespace(value: str) -> bool:
    """Whether ``value`` is a namespace this endpoint accepts: ``app_label.model`` or
    ``app_label.model::name``, at most ``MAX_NAMESPACE_LENGTH`` printable ASCII characters
    without spaces, quotes or backslashes."""
    return len(value) <= MAX_NAMESPACE_LENGTH and _NAMESPACE.fullmatch(value) is not None


def requested_namespaces(request: HttpRequest) -> list[str]:
    """The request's distinct ``ns`` values, checked; :class:`BadRequest` otherwise."""
    limit = int(settings.EVENTS_MAX_NAMESPACES)
    try:
        namespaces = list(dict.fromkeys(request.GET.getlist("ns")))
    except TooManyFieldsSent:
        raise BadRequest(f"ask for at most {limit} namespaces per request (ns)") from None
    if not namespaces:
        raise BadRequest("ask for at least one namespace: ?ns=app_label.model")
    if len(namespaces) > limit:
        raise BadRequest(
            f"ask for at most {limit} namespaces per request (ns), not {len(namespaces)}"
        )
    for number, namespace in enumerate(namespaces, 1):
        if not is_namespace(namespace):
            raise BadRequest(
                f"namespace {number} of {len(namespaces)} is not app_label.model or "
                f"app_label.model::name of at most {MAX_NAMESPACE_LENGTH} printable ASCII "
                "characters without spaces, quotes or backslashes"
            )
    return namespaces


def may_subscribe(request: HttpRequest, namespace: str) -> bool:
    """The default permission: the user may ``view`` the namespace's registered model.

    A tenant namespace (``app_label.model::name``) is refused: which user may see
    which tenant is the project's to say, with an ``EVENTS_PERMISSION`` hook.
    """
    if SEPARATOR in namespace:
        return False
    try:
        model = registry.get_model(namespace)
    except (LookupError, ValueError):
        return False
    meta = model._meta
    return request.user.has_perm(f"{meta.app_label}.view_{meta.model_name}")


def permission() -> Callable[[HttpRequest, str], bool]:
    """Who may see a namespace: the ``EVENTS_PERMISSION`` hook, else :func:`may_subscribe`.

    The one rule for every way events leave ormbridge: the events endpoint, and the
    Channels and django-eventstream integrations (``ormbridge.contrib``).
    """
    hook = settings.EVENTS_PERMISSION
    return cast(Callable[[HttpRequest, str], bool], import_string(hook)) if hook else may_subscribe


def authorize(
    request: HttpRequest, namespaces: list[str], *, reload: bool = False
) -> tuple[bool, list[str], list[str]]:
    """Whether the user is logged in, and which namespaces they may and may not see.

    With ``reload``, the session and the user are read again from their stores
    first (:func:`reload_user`: an open stream's or socket's re-check).
    """
    if reload:
        reload_user(request)
    if not request.user.is_authenticated:
        return False, [], namespaces
    allowed_by = permission()
    allowed: list[str] = []
    denied: list[str] = []
    for namespace in namespaces:
        (allowed if allowed_by(request, namespace) else denied).append(namespace)
    return True, allowed, denied


def reload_user(request: HttpRequest) -> None:
    """Set ``request.user`` to the user its session names now, checked as Django's
    ``get_user`` checks it (backend, active, password hash), without writing to the
    session: a deleted or expired session, a deactivated user or a changed password
    leave an anonymous user. Without sessions, the same user read again."""
    # Here, not at the top: an emitter that imports this module (for SEPARATOR) must
    # not need django.contrib.auth installed.
    from django.contrib.auth.models import AnonymousUser

    session = getattr(request, "session", None)
    if session is None:
        user = request.user
        fresh = None
        if user.is_authenticated:
            fresh = get_user_model()._default_manager.filter(pk=user.pk).first()
        active = fresh is not None and getattr(fresh, "is_active", True)
        request.user = fresh if fresh is not None and active else AnonymousUser()
        return
    engine = import_module(django_settings.SESSION_ENGINE)
    data = engine.SessionStore(session.session_key)
    request.user = AnonymousUser()
    try:
        user_id = get_user_model()._meta.pk.to_python(data[SESSION_KEY])
        backend_path = data[BACKEND_SESSION_KEY]
    except KeyError:
        return
    if backend_path not in django_settings.AUTHENTICATION_BACKENDS:
        return
    found = load_backend(backend_path).get_user(user_id)
    if found is None:
        return
    if hasattr(found, "get_session_auth_hash"):
        stored = data.get(HASH_SESSION_KEY)
        hashes = [found.get_session_auth_hash(), *found.get_session_auth_fallback_hash()]
        if not stored or not any(constant_time_compare(stored, h) for h in hashes):
            return
    request.user = found
