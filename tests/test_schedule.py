"""Periodic work: ormbridge_schedule installs it, beat with the database scheduler runs it."""

import os
import subprocess
import sys
from io import StringIO

import pytest
from django.core.management import call_command
from django_celery_beat.models import PeriodicTask

from ormbridge import outbox, schedule
from ormbridge.models import ChangeBatch
from tests.conftest import ROOT, RUN_DIR, wait_until

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
    assert schedule.beat_schedule()["ormbridge.sweep_outbox"] == {
        "task": "ormbridge.sweep_outbox",
        "schedule": 60.0,
        "options": {"queue": "ormbridge"},
    }


def test_beat_with_the_database_scheduler_runs_sweep_outbox(worker, settings, django_db_blocker):
    from django.db import connection

    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "SWEEP_INTERVAL": 1}
    schedule.install()
    batch = ChangeBatch.objects.create(model="shop.product", action="invalidate", pks=[1])
    log = RUN_DIR / "beat.log"
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
        wait_until(lambda: ChangeBatch.objects.get(pk=batch.pk).state == "done", 60, "beat's sweep")
    finally:
        beat.terminate()
        beat.wait(30)
    assert "ormbridge.sweep_outbox" in log.read_text()


def test_sweep_gives_up_after_max_attempts(idle_queue, settings):
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "MAX_ATTEMPTS": 3}
    batch = ChangeBatch.objects.create(
        model="shop.product", action="update", pks=[1], attempts=3, last_error="boom"
    )
    result = outbox.sweep()
    batch.refresh_from_db()
    assert (result.failed, result.enqueued) == (1, 0)
    assert (batch.state, batch.last_error) == ("failed", "boom")
    assert idle_queue() == 0
