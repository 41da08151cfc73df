"""The helper app of the peer check's ormbridge run: registers every model of the tested packages.

Installed before ``ormbridge`` so its ``ready()`` runs first, as ``@ormbridge.register`` on a
model class would, and before any migration: ormbridge sets up what a registered model needs
(receivers, database triggers) in its own ``ready()`` and ``post_migrate``.

Installed as ``"tests.django_suite.peerapp.PeerAppConfig"``. The packages come from
``DJANGO_SUITE_PACKAGES`` (space separated app labels), set by ``run.py``.
"""

import os

from celery import Celery
from django.apps import AppConfig, apps

# The project's Celery app, made the standard way (settings' CELERY_BROKER_URL is memory://).
celery_app = Celery("django_suite")
celery_app.config_from_object("django.conf:settings", namespace="CELERY")
celery_app.set_default()

REGISTERED: list[str] = []
"""Labels of the models registered by the last ``ready()``, for the wrapper's report."""


def registrable(model):
    """Whether ``ormbridge.register`` takes ``model``: concrete, not a proxy, not swapped.

    Auto-created m2m through models are left out (they are not in ``get_models()``);
    ormbridge covers them through the models they link.
    """
    meta = model._meta
    return not (meta.abstract or meta.proxy or meta.swapped or meta.auto_created)


class PeerAppConfig(AppConfig):
    name = "tests.django_suite.peerapp"
    label = "django_suite_peer"
    verbose_name = "ormbridge peer check"

    def ready(self):
        import ormbridge

        labels = os.environ.get("DJANGO_SUITE_PACKAGES", "").split()
        registered = []
        for label in labels:
            try:
                config = apps.get_app_config(label)
            except LookupError:
                continue  # a package that is not installed in this run
            for model in config.get_models():
                if registrable(model):
                    ormbridge.register(model)
                    registered.append(model._meta.label)
        if registered:  # runtests sets up the apps twice: without, then with the packages
            REGISTERED[:] = registered
            print(
                f"ormbridge peer check: registered {len(registered)} models: {' '.join(registered)}"
            )
