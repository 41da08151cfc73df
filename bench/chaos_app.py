"""What the chaos load test (bench/chaos.py) installs in every process it starts.

``FileEmitter`` appends each event a relay emits, and ``record_replay`` each
replayed ``post_save``, as a JSON line to a file of the process's own in
``CHAOS_RUN_DIR``. One ``write()`` per line on an ``O_APPEND`` descriptor: a
process killed by SIGKILL keeps every line it wrote, so the files are what the
workers really did, for the comparison with the database at the end.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_save

from ormbridge.broadcast import Emitter, Event

_files: dict[tuple[str, int], int] = {}


def append(kind: str, record: dict[str, Any]) -> None:
    """One JSON line in ``<CHAOS_RUN_DIR>/<kind>-<pid>.jsonl``."""
    key = (kind, os.getpid())  # a forked pool child opens its own
    if key not in _files:
        path = Path(os.environ["CHAOS_RUN_DIR"]) / f"{kind}-{key[1]}.jsonl"
        _files[key] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_files[key], (json.dumps(record, default=str) + "\n").encode())


class FileEmitter(Emitter):
    def emit(self, events: list[Event]) -> None:
        for event in events:
            append("events", dict(event))


def record_replay(sender: Any, instance: Any, **kwargs: Any) -> None:
    if kwargs.get("ormbridge_replay"):
        append("replays", {"pk": instance.pk, "t": time.time(), "price": instance.price})


class ChaosConfig(AppConfig):
    name = "bench.chaos_app"
    label = "chaos"

    def ready(self) -> None:
        from shop.models import Product

        post_save.connect(record_replay, sender=Product, dispatch_uid="chaos-replays")
