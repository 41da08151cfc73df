"""Two projects on one broker: each sends ormbridge's tasks to a queue of its own (derived
from ``KEY_PREFIX``), and a worker refuses (logs, acks, counts) a task sent under another
project's prefix, or by another site (another database) under the same prefix."""

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.db import connection, connections
from django.test import override_settings
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from ormbridge import redis_store, resync, schedule, tasks
from ormbridge.conf import settings as ormbridge_settings
from ormbridge.models import ChangeBatch, ResyncJob
from tests.commands import run
from tests.conftest import RUN_DIR, Worker, wait_until
from tests.factories import make_products

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]

OTHER = "shop-b"  # project B's KEY_PREFIX; project A (these tests) keeps the default
B_QUEUE = "ormbridge.shop-b"  # project B's default queue


def as_project_b(settings, **values) -> None:
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "KEY_PREFIX": OTHER, **values}


def refused(task: str) -> int:
    """Refusals of ``task`` counted under project A's prefix."""
    return int(redis_store.get_redis().hget(redis_store.refused_key(), task) or 0)


def a_worker(start_worker: Callable[..., Worker], prefix: str | None = None) -> Worker:
    """A worker of project A (or of the project with ``prefix``) on its default queue,
    without a relay: only its tasks touch the change log."""
    own = {"RELAY": False, **({"KEY_PREFIX": prefix} if prefix else {})}
    queue = "ormbridge" if prefix is None else f"ormbridge.{prefix}"
    return start_worker(queue=queue, env={"ORMBRIDGE_TEST_SETTINGS": json.dumps(own)})


def pending_row() -> ChangeBatch:
    """An undelivered change-log row: a sweep that runs delivers it."""
    return ChangeBatch.objects.create(model="shop.product", action="update", pks=[1], rows=1)


def test_the_default_queue_follows_the_key_prefix(settings):
    assert ormbridge_settings.QUEUE == "ormbridge"  # the default prefix keeps the old name
    as_project_b(settings)
    assert ormbridge_settings.QUEUE == B_QUEUE
    as_project_b(settings, QUEUE="cache-sync")
    assert ormbridge_settings.QUEUE == "cache-sync"  # a queue set by hand is kept


def test_a_task_of_another_project_waits_for_that_projects_worker(
    no_relay, start_worker, broker, settings
):
    worker_a = a_worker(start_worker)
    row = pending_row()
    with override_settings(ORMBRIDGE={**settings.ORMBRIDGE, "KEY_PREFIX": OTHER}):
        sent_by_b = tasks.enqueue(tasks.sweep)
    assert broker.llen(B_QUEUE) == 1  # not on the queue A's worker consumes
    sent_by_a = tasks.enqueue(tasks.sweep)
    wait_until(lambda: f"[{sent_by_a}] succeeded" in worker_a.log_text(), 60, "A's own sweep")
    assert sent_by_b not in worker_a.log_text()
    assert broker.llen(B_QUEUE) == 1  # B's sweep waits for B's worker
    worker_b = a_worker(start_worker, prefix=OTHER)
    wait_until(lambda: f"[{sent_by_b}] succeeded" in worker_b.log_text(), 60, "B's sweep")
    assert "refused" not in worker_b.log_text()
    row.refresh_from_db()
    assert row.state == "done"


@pytest.mark.parametrize("sender", ["another prefix", "no prefix"])
def test_a_worker_refuses_a_task_not_sent_under_its_prefix(
    no_relay, start_worker, broker, settings, sender
):
    worker_a = a_worker(start_worker)
    row = pending_row()
    if sender == "another prefix":  # B set QUEUE by hand to A's queue
        with override_settings(
            ORMBRIDGE={**settings.ORMBRIDGE, "KEY_PREFIX": OTHER, "QUEUE": "ormbridge"}
        ):
            tasks.enqueue(tasks.sweep)
    else:  # an old beat schedule, or a task sent by hand
        tasks.sweep.apply_async(queue="ormbridge")
    wait_until(lambda: refused("ormbridge.sweep") or row_state(row) == "done", 60, "the sweep")
    assert row_state(row) == "pending"  # the sweep did nothing
    assert refused("ormbridge.sweep") == 1
    assert broker.llen("ormbridge") == 0  # acknowledged, not left to be redelivered
    assert "refused ormbridge.sweep" in worker_a.log_text()


def row_state(row: ChangeBatch) -> str:
    return ChangeBatch.objects.get(pk=row.pk).state


@dataclass
class Site:
    """Another site: its own database (same server, same schema), same default KEY_PREFIX."""

    name: str
    alias: str

    def pending_row(self) -> ChangeBatch:
        return ChangeBatch.objects.using(self.alias).create(
            model="shop.product", action="update", pks=[1], rows=1
        )

    def state(self, row: ChangeBatch) -> str:
        return ChangeBatch.objects.using(self.alias).get(pk=row.pk).state


@pytest.fixture
def site_b() -> Iterator[Site]:
    """Site B's database, migrated by a process of its own, dropped afterwards."""
    default = connection.settings_dict
    if connection.vendor == "postgresql":
        name = f"{default['NAME']}_site_b"
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cursor.execute(f'CREATE DATABASE "{name}"')
    else:
        name = str(RUN_DIR / "site-b.sqlite3")
        Path(name).unlink(missing_ok=True)
    migrated = run("migrate", env={"ORMBRIDGE_TEST_DB_NAME": name})
    assert migrated.returncode == 0, migrated.stderr
    alias = "site_b"
    connections[alias] = type(connections["default"])({**default, "NAME": name}, alias)
    try:
        yield Site(name, alias)
    finally:
        connections[alias].close()
        del connections[alias]
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            Path(name).unlink(missing_ok=True)


@pytest.mark.parametrize("task", ["sweep", "resume_resync"])
def test_a_task_of_another_site_with_the_same_prefix_is_refused(
    no_relay, start_worker, broker, site_b, task
):
    """Issue 17, item 8: with both sites at the default KEY_PREFIX (and so on one queue),
    B's worker ran A's sweep against B's database."""
    worker_b = start_worker(
        env={
            "ORMBRIDGE_TEST_DB_NAME": site_b.name,
            "ORMBRIDGE_TEST_SETTINGS": json.dumps({"RELAY": False}),
        }
    )
    row = site_b.pending_row()  # a sweep run on B's database delivers it
    job = ResyncJob.objects.using(site_b.alias).create(
        labels=["shop.product"], chunk_size=10, state="interrupted"
    )  # a resume run on B's database finishes it
    if task == "sweep":
        tasks.enqueue(tasks.sweep)  # site A's sweep, on the queue both sites consume
    else:  # A's admin resumes A's job of the same id
        tasks.enqueue(tasks.resume_resync, job.pk)

    def b_touched() -> bool:
        job_state = ResyncJob.objects.using(site_b.alias).get(pk=job.pk).state
        return site_b.state(row) != "pending" or job_state != "interrupted"

    name = f"ormbridge.{task}"
    wait_until(lambda: refused(name) or b_touched(), 60, f"{name} to end")
    assert not b_touched()  # the task did nothing on B's database
    assert refused(name) == 1
    assert broker.llen("ormbridge") == 0  # acknowledged, not left to be redelivered
    log = worker_b.log_text()
    assert f"refused {name}[" in log and "another site" in log, log


def test_a_task_without_a_site_identity_is_refused(no_relay, start_worker, broker):
    """A message of an older ormbridge or beat schedule: its prefix alone says too little."""
    worker_a = a_worker(start_worker)
    row = pending_row()
    tasks.sweep.apply_async(kwargs={"key_prefix": "ormbridge"}, queue="ormbridge")
    wait_until(lambda: refused("ormbridge.sweep") or row_state(row) == "done", 60, "the sweep")
    assert row_state(row) == "pending"
    assert refused("ormbridge.sweep") == 1
    assert "manage.py ormbridge_schedule" in worker_a.log_text()


def test_a_resync_resumed_under_another_prefix_is_refused(no_relay, settings):
    make_products(3)
    job = resync.start(resync.select(["shop.Product"]))
    resync.interrupt(job, "interrupted")
    tasks.resume_resync.apply(args=[job.pk], kwargs={"key_prefix": OTHER})
    assert ResyncJob.objects.get(pk=job.pk).state == "interrupted"
    assert refused("ormbridge.resume_resync") == 1


def test_the_status_shows_refused_tasks(no_relay):
    tasks.sweep.apply(kwargs={"key_prefix": OTHER})
    report = json.loads(run("ormbridge_status", "--json").stdout)
    assert report["refused_tasks"] == {"ormbridge.sweep": 1}


def test_the_beat_schedule_carries_the_key_prefix(settings):
    as_project_b(settings)
    [entry] = schedule.beat_schedule().values()
    assert entry["kwargs"] == {"key_prefix": OTHER, "site": tasks.site_id()}
    assert entry["options"] == {"queue": B_QUEUE}


def test_the_installed_periodic_task_carries_the_key_prefix(settings):
    as_project_b(settings)
    schedule.install()
    [row] = PeriodicTask.objects.filter(task="ormbridge.sweep")
    assert json.loads(row.kwargs) == {"key_prefix": OTHER, "site": tasks.site_id()}
    assert row.queue == B_QUEUE
    assert row.date_changed <= timezone.now()
