"""Which models ormbridge watches, and the signal receivers that watch them.

Receivers are connected per model with ``sender=`` and a ``dispatch_uid``:
a receiver connected for every model would send every model's deletes down
Django's slow path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from django.apps import apps
from django.db import models
from django.db.models.signals import m2m_changed, post_delete, post_save

from ormbridge import buffer
from ormbridge.conf import settings

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


@overload
def register(model: M, **options: Any) -> M: ...
@overload
def register(model: None = None, **options: Any) -> Callable[[M], M]: ...


def register(model: M | None = None, **options: Any) -> M | Callable[[M], M]:
    """Watch ``model``: its saves, deletes and m2m changes invalidate caches.

    Usable as ``register(Product)``, ``@register`` or ``@register(cache_timeout=60)``.
    Options: ``cache_timeout``, ``namespaces`` (a row's extra event namespaces),
    ``payload`` (field values in events; off by default).
    Registering a model again with the same options does nothing.

    Raises:
        TypeError: ``model`` is not a concrete Django model, or an option is unknown.
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
    if label in _registry and _registry[label] != opts:
        raise ValueError(
            f"{model._meta.label} is already registered with ormbridge with other options "
            f"({_registry[label]}); register it once."
        )
    _registry[label] = opts
    _connect(model)
    if apps.ready:
        connect_related()
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
            f"{meta.concrete_model._meta.label} (its proxies are covered)."
        )
    if meta.swapped:
        raise TypeError(f"ormbridge.register(): {meta.label} is swapped out for {meta.swapped}.")


def is_registered(model: type[models.Model]) -> bool:
    return model._meta.concrete_model._meta.label_lower in _registry


def options(model: type[models.Model]) -> Options:
    """Options of a registered model. Raises ``LookupError`` if it is not registered."""
    label = model._meta.concrete_model._meta.label_lower
    try:
        return _registry[label]
    except KeyError:
        raise LookupError(f"{model._meta.label} is not registered with ormbridge.") from None


def registered_models() -> list[type[models.Model]]:
    return [apps.get_model(label) for label in sorted(_registry)]


def get_model(label: str) -> type[models.Model]:
    """The registered model for ``app_label.modelname``; ``LookupError`` otherwise."""
    model = apps.get_model(label)
    if not is_registered(model):
        raise LookupError(f"{model._meta.label} is not registered with ormbridge.")
    return model


def targets(model: type[models.Model]) -> list[type[models.Model]]:
    """Registered models whose rows change when a row of ``model`` is written.

    A proxy writes its concrete model's table; a multi-table child also writes
    its parents' tables, which share its pk.
    """
    concrete = model._meta.concrete_model
    return [m for m in [concrete, *concrete._meta.get_parent_list()] if is_registered(m)]


def register_from_settings() -> None:
    """Register ``ORMBRIDGE["MODELS"]``. Bad entries are skipped here and reported by checks."""
    entries = settings.MODELS
    if not isinstance(entries, list | tuple):
        return
    for label in entries:
        try:
            model = apps.get_model(label)
            _check_model(model)
        except (LookupError, TypeError, ValueError):
            continue
        if not is_registered(model):
            register(model)


def connect_related() -> None:
    """Connect proxies and multi-table children of registered models.

    Their signals carry their own class as sender, so receivers connected to
    the registered model alone would miss them. Called once apps are ready.
    """
    for model in apps.get_models():
        if targets(model):
            _connect(model)
    for model in apps.get_models(include_auto_created=True):
        if model._meta.auto_created and any(
            is_registered(f.related_model) for f in model._meta.fields if f.is_relation
        ):
            _connect_m2m(model)
    for model in registered_models():
        for field in model._meta.many_to_many:
            _connect_m2m(field.remote_field.through)


def _connect(model: type[models.Model]) -> None:
    label = model._meta.label_lower
    post_save.connect(_on_save, sender=model, dispatch_uid=f"ormbridge:save:{label}")
    post_delete.connect(_on_delete, sender=model, dispatch_uid=f"ormbridge:delete:{label}")


def _connect_m2m(through: type[models.Model]) -> None:
    m2m_changed.connect(
        _on_m2m, sender=through, dispatch_uid=f"ormbridge:m2m:{through._meta.label_lower}"
    )


def _on_save(
    sender: type[models.Model],
    instance: models.Model,
    created: bool,
    update_fields: frozenset[str] | None,
    using: str,
    **kwargs: Any,
) -> None:
    if kwargs.get("ormbridge_replay"):
        return  # a replay of a change ormbridge already recorded
    action = "c" if created else "u"
    fields = None if created or update_fields is None else update_fields
    for model in targets(sender):
        buffer.record(model, [instance.pk], action, fields, using)


def _on_delete(
    sender: type[models.Model], instance: models.Model, using: str, **kwargs: Any
) -> None:
    if kwargs.get("ormbridge_replay"):
        return
    for model in targets(sender):
        buffer.record(model, [instance.pk], "d", None, using)


def _on_m2m(
    sender: type[models.Model],
    instance: models.Model,
    action: str,
    reverse: bool,
    model: type[models.Model],
    pk_set: set[Any] | None,
    using: str,
    **kwargs: Any,
) -> None:
    if not action.startswith("post_"):
        return
    for target in targets(type(instance)):
        buffer.record(target, [instance.pk], "u", {_m2m_name(type(instance), sender)}, using)
    if pk_set:
        for target in targets(model):
            buffer.record(target, sorted(pk_set), "u", {_m2m_name(model, sender)}, using)


def _m2m_name(model: type[models.Model], through: type[models.Model]) -> str:
    """The name, on ``model``, of the m2m relation stored in ``through``."""
    for field in model._meta.get_fields():
        if field.many_to_many and getattr(field.remote_field, "through", None) is through:
            return field.name
        if field.many_to_many and getattr(field, "through", None) is through:
            return field.get_accessor_name() or field.name
    return through._meta.model_name
