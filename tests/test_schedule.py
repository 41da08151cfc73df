"""Periodic work: ormbridge_schedule installs it, beat with the database scheduler runs it."""

import os
import re
import subprocess
import sys
from datetime import timedelta
from io import StringIO

import pytest
from celery import Celery, current_app
from celery.beat import Scheduler
from django.core.management import call_command
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from ormbridge import schedule, tasks
from ormbridge.models import ChangeBatch, ResyncJob
from tests.conftest import ROOT, RUN_DIR, wait_until
from tests.factories import log_mark, logged_since

pytestmark = pytest.mark.django_db(transaction=True)


def test_schedule_twice_leaves_one_row_per_task(settings):
    call_command("ormbridge_schedule", stdout=StringIO())
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "SWEEP_INTERVAL": 30}
    call_command("ormbridge_schedule", stdout=StringIO())
    rows = PeriodicTask.objects.filter(task__startswith="ormbridge.")
    assert sorted(rows.values_list("task", flat=True)) == sorted(schedule.PERIODIC_TASKS)
    assert {row.interval.every for row in rows} == {30}
    assert {row.queue for row in rows} == {"ormbridge"}


def test_the_beat_schedule_dict_matches(settings):
    assert schedule.beat_schedule() == {
        "ormbridge.sweep": {
            "task": "ormbridge.sweep",
            "schedule": 60.0,
            # workers refuse a task without them
            "kwargs": {"key_prefix": "ormbridge", "site": tasks.site_id()},
            "options": {"queue": "ormbridge"},
        }
    }


def test_beat_with_the_database_scheduler_runs_the_sweep(worker, settings):
    from django.db import connection

    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "SWEEP_INTERVAL": 1}
    schedule.install()
    # only the sweep deletes delivered rows past LOG_RETENTION (the relays never do)
    old = ChangeBatch.objects.create(
        model="shop.product", action="invalidate", pks=[1], state="done",
        finished_at=timezone.now() - timedelta(days=2),
    )  # fmt: skip
    log = RUN_DIR / "beat.log"
    log.unlink(missing_ok=True)
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "example", "beat", "-S",
         "django_celery_beat.schedulers:DatabaseScheduler", "--max-interval", "1",
         "-s", str(RUN_DIR / "beat-schedule"), "-l", "INFO", "--logfile", str(log)],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
             "ORMBRIDGE_TEST_DB_NAME": connection.settings_dict["NAME"],
             "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example")])},
    )  # fmt: skip
    try:
        wait_until(lambda: not ChangeBatch.objects.filter(pk=old.pk).exists(), 60, "beat's sweep")
    finally:
        beat.terminate()
        try:
            beat.wait(30)
        except subprocess.TimeoutExpired:
            # beat's SIGTERM handler raises SystemExit, which is lost when it lands in a
            # __del__ (seen: AsyncResult.__del__); a beat left running sends sweeps forever.
            beat.kill()
            beat.wait()
    assert "ormbridge.sweep" in log.read_text()


def log_row(state: str = "pending", **fields) -> ChangeBatch:
    return ChangeBatch.objects.create(
        model="shop.product", action="update", pks=[1], rows=1, state=state, **fields
    )


def test_sweep_gives_up_after_max_attempts(no_relay, settings):
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "MAX_ATTEMPTS": 3}
    spent = log_row(attempts=3, last_error="boom")
    last_try = log_row(attempts=2, last_error="boom")
    tasks.sweep()
    spent.refresh_from_db()
    last_try.refresh_from_db()
    assert (spent.state, spent.attempts, spent.last_error) == ("failed", 3, "boom")
    assert (last_try.state, last_try.attempts, last_try.last_error) == ("done", 3, "")


def test_sweep_prunes_old_delivered_rows_and_delivers_what_no_relay_took(no_relay, settings):
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "LOG_RETENTION": 60}
    now = timezone.now()
    job = ResyncJob.objects.create(labels=["shop.product"], chunk_size=10)
    mark = log_mark()
    old = log_row("done", finished_at=now - timedelta(seconds=120))
    recent = log_row("done", finished_at=now - timedelta(seconds=10))
    old_chunk = log_row("done", finished_at=now - timedelta(seconds=120), job=job)
    pending = log_row()
    abandoned = log_row(  # a relay died holding it: its lease ran out
        "claimed", claimed_by="dead relay", attempts=1, lease_until=now - timedelta(seconds=1)
    )
    held = log_row(  # a live relay holds it
        "claimed", claimed_by="live relay", attempts=1, lease_until=now + timedelta(seconds=60)
    )
    failed = log_row("failed", attempts=5, last_error="boom")

    tasks.sweep()

    assert not ChangeBatch.objects.filter(pk=old.pk).exists()
    states = dict(logged_since(mark).values_list("id", "state"))
    assert states == {
        recent.pk: "done",
        old_chunk.pk: "done",  # a resync job's chunks stay: they are its progress
        pending.pk: "done",
        abandoned.pk: "done",
        held.pk: "claimed",
        failed.pk: "failed",
    }
    assert ChangeBatch.objects.get(pk=held.pk).claimed_by == "live relay"
    assert ChangeBatch.objects.get(pk=abandoned.pk).attempts == 2


DOCS = ROOT / "docs"
# Python blocks of the docs that give ormbridge's periodic tasks to beat without the
# database scheduler, and how to read the schedule each one makes.
DOCUMENTED_SCHEDULES = {
    "operations.md: the Celery app's beat_schedule": (
        DOCS / "operations.md",
        "app.conf.beat_schedule",
        lambda namespace: namespace["app"].conf.beat_schedule,
    ),
    "install.md: the Celery app's beat_schedule": (
        DOCS / "install.md",
        "app.conf.beat_schedule",
        lambda namespace: namespace["app"].conf.beat_schedule,
    ),
}


def documented_schedule(name: str) -> dict:
    """Run the doc's one Python block that makes the schedule, as a project would paste it."""
    path, marker, read = DOCUMENTED_SCHEDULES[name]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", path.read_text(), re.S) if marker in b]
    assert len(blocks) == 1, f"{path.name}: {len(blocks)} Python blocks hold {marker}"
    namespace = {"app": Celery("proj", set_as_current=False)}
    exec(compile(blocks[0], str(path), "exec"), namespace)
    return read(namespace)


@pytest.mark.parametrize("name", DOCUMENTED_SCHEDULES)
def test_a_documented_beat_schedule_is_run_by_a_real_worker_not_refused(worker, name):
    """Issue 17, item 10: the settings snippet sent the sweep without KEY_PREFIX: every
    worker refused it, and the change log was never pruned. (A snippet in settings
    cannot carry the site's identity, a digest: the docs give beat_schedule().)"""
    entries = documented_schedule(name)
    old = ChangeBatch.objects.create(
        model="shop.product", action="invalidate", pks=[1], state="done",
        finished_at=timezone.now() - timedelta(days=2),
    )  # fmt: skip
    start = len(worker.log_text())
    beat = Scheduler(app=current_app, lazy=True)  # what beat sends each entry with
    beat.update_from_dict(entries)
    for entry in beat.schedule.values():
        beat.apply_async(entry, advance=False)
    refused = lambda: "refused" in worker.log_text()[start:]  # noqa: E731
    wait_until(
        lambda: refused() or not ChangeBatch.objects.filter(pk=old.pk).exists(), 60, "the sweep"
    )
    assert not refused(), worker.log_text()[start:]
    assert not ChangeBatch.objects.filter(pk=old.pk).exists()
    assert entries == schedule.beat_schedule()  # the test settings' values are the defaults
