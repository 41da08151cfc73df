"""Which models ormbridge watches, and with which options.

Registering connects nothing to Django's signals: the capture triggers
(:mod:`ormbridge.capture`) see every write, so Django's fast delete and fast
many-to-many paths stay on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from django.apps import apps
from django.db import models
from django.utils.module_loading import import_string

from ormbridge.conf import settings

__all__ = [
    "Options",
    "composite_pk",
    "get_model",
    "is_registered",
    "label_of",
    "on_change",
    "options",
    "options_from_settings",
    "register",
    "register_from_settings",
    "registered_models",
    "settings_entries",
]

M = TypeVar("M", bound=type[models.Model])


@dataclass(frozen=True)
class Options:
    """Per-model options given to :func:`register`."""

    cache_timeout: int | None = None
    """Seconds cached instances and querysets of this model live; None: ``CACHE_TIMEOUT``."""
    namespaces: Callable[[Any], Iterable[str]] | None = None
    """Extra event namespaces of a row: names ``n`` give ``app_label.model::n`` (e.g. a tenant)."""
    payload: Callable[[Any], Any] | None = None
    """Opt in to field values in events: returns the JSON-able data of a row."""


_registry: dict[str, Options] = {}
# Parents registered because a multi-table child was: their own register() may set options.
_implied: set[str] = set()
_listeners: list[Callable[[], None]] = []


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener`` whenever a model is registered (caches of the registry)."""
    _listeners.append(listener)


@overload
def register(model: M, **options: Any) -> M: ...
@overload
def register(model: None = None, **options: Any) -> Callable[[M], M]: ...


def register(model: M | None = None, **options: Any) -> M | Callable[[M], M]:
    """Watch ``model``: every write to its table and m2m tables invalidates caches.

    Usable as ``register(Product)``, ``@register`` or ``@register(cache_timeout=60)``.
    Options: ``cache_timeout``, ``namespaces`` (a row's extra event namespaces),
    ``payload`` (field values in events; off by default).
    Registering a model again with the same options does nothing. A
    multi-table child's parents are registered with it (their tables hold part
    of its rows), with default options unless registered themselves.

    Raises:
        TypeError: ``model`` is not a concrete Django model, has a composite primary
            key, or an option is unknown.
        ValueError: the model is already registered with other options.
    """
    if model is None:
        return lambda cls: register(cls, **options)
    _check_model(model)
    try:
        opts = Options(**options)
    except TypeError:
        known = ", ".join(Options.__dataclass_fields__)
        raise TypeError(
            f"register({model.__name__}): unknown option(s) "
            f"{', '.join(sorted(set(options) - set(Options.__dataclass_fields__)))}; "
            f"known options: {known}"
        ) from None
    label = model._meta.label_lower
    if label in _registry and _registry[label] != opts and label not in _implied:
        raise ValueError(
            f"{model._meta.label} is already registered with ormbridge with other options "
            f"({_registry[label]}); register it once."
        )
    _registry[label] = opts
    _implied.discard(label)
    for parent in model._meta.get_parent_list():
        if parent._meta.label_lower not in _registry:
            _registry[parent._meta.label_lower] = Options()
            _implied.add(parent._meta.label_lower)
    for listener in _listeners:
        listener()
    return model


def _check_model(model: object) -> None:
    if not (isinstance(model, type) and issubclass(model, models.Model)):
        raise TypeError(f"ormbridge.register() takes a Django model class, not {model!r}.")
    meta = model._meta
    if meta.abstract:
        raise TypeError(f"ormbridge.register(): {meta.label} is abstract and has no rows.")
    if meta.proxy:
        raise TypeError(
            f"ormbridge.register(): {meta.label} is a proxy; register its concrete model "
            # django-stubs: concrete_model is Optional; it is set on every model class.
            f"{meta.concrete_model._meta.label} (its proxies are covered)."  # type: ignore[union-attr]
        )
    if meta.swapped:
        raise TypeError(f"ormbridge.register(): {meta.label} is swapped out for {meta.swapped}.")
    if composite_pk(model):
        raise TypeError(
            f"ormbridge.register(): {meta.label} has a composite primary key "
            f"({', '.join(f.name for f in meta.pk_fields)}); ormbridge logs, caches and "
            "announces a row by one primary-key column, so it cannot capture this model."
        )


def composite_pk(model: type[models.Model]) -> bool:
    """Whether ``model`` (or a parent holding part of its rows) has a composite primary key:
    its rows have no single pk column for the change log to carry."""
    return any(m._meta.is_composite_pk for m in (model, *model._meta.get_parent_list()))


def is_registered(model: type[models.Model]) -> bool:
    return label_of(model) in _registry


def options(model: type[models.Model]) -> Options:
    """Options of a registered model. Raises ``LookupError`` if it is not registered."""
    label = label_of(model)
    try:
        return _registry[label]
    except KeyError:
        raise LookupError(f"{model._meta.label} is not registered with ormbridge.") from None


def registered_models() -> list[type[models.Model]]:
    return [apps.get_model(label) for label in sorted(_registry)]


def label_of(model: type[models.Model]) -> str:
    """The label of a model's concrete model (a proxy's rows are its concrete model's)."""
    # django-stubs: concrete_model is Optional; it is set on every model class.
    return model._meta.concrete_model._meta.label_lower  # type: ignore[union-attr]


def get_model(label: str, registered: bool = True) -> type[models.Model]:
    """The model ``app_label.ModelName`` names, a registered one unless ``registered``
    is False.

    Raises:
        LookupError: no such model, or it is not registered; the message says which,
            for the user (the management commands and ``resync`` pass it on).
    """
    try:
        model = apps.get_model(label)
    except (LookupError, ValueError):
        raise LookupError(f"unknown model {label!r}; use app_label.ModelName.") from None
    if registered and not is_registered(model):
        raise LookupError(f"{model._meta.label} is not registered with ormbridge.")
    return model


def settings_entries() -> list[tuple[str, dict[str, Any]]]:
    """``ORMBRIDGE["MODELS"]`` as ``(label, options)`` pairs: a list of labels, or a dict
    of label -> ``register()`` options (callables as dotted paths). Malformed: empty."""
    entries = settings.MODELS
    if isinstance(entries, dict):
        return [(label, opts if isinstance(opts, dict) else {}) for label, opts in entries.items()]
    if isinstance(entries, list | tuple):
        return [(label, {}) for label in entries]
    return []


def options_from_settings(options: dict[str, Any]) -> dict[str, Any]:
    """``register()`` options from a ``MODELS`` entry: dotted paths imported.

    Raises:
        ImportError: a dotted path cannot be imported.
    """
    return {
        name: import_string(value)
        if name in ("namespaces", "payload") and isinstance(value, str)
        else value
        for name, value in options.items()
    }


def register_from_settings() -> None:
    """Register ``ORMBRIDGE["MODELS"]``. Bad entries are skipped here and reported by checks."""
    for label, options in settings_entries():
        try:
            model = apps.get_model(label)
            _check_model(model)
            if not is_registered(model):
                register(model, **options_from_settings(options))
        except (LookupError, TypeError, ValueError, ImportError):
            continue
