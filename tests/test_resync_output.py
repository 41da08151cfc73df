"""What ormbridge_resync prints, and what Ctrl-C means (issue 10, operations 17).

Progress is counted from the job's state (rows of delivered chunks), never
added up from what this run saw; it goes to stderr (stdout keeps the job's
result lines for scripts) in the normal style, not the error style. Ctrl-C
while this process writes or delivers chunks stops the job (``--resume``
continues it); Ctrl-C while only watching the workers (``--wait`` once every
chunk is handed out) stops watching, and the workers finish the job.
"""

import os
import re
import signal
import subprocess
import sys
import threading

import pytest
from django.db import connection

from ormbridge import resync
from ormbridge.models import ResyncJob
from tests import commands, replays
from tests.conftest import ROOT, wait_until
from tests.factories import make_products

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases]

RED = b"\x1b[31"


def progress_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.search(r" rows \w+ \(\d+%\)$", line)]


def test_resume_with_wait_counts_the_rows_done_before_once(no_relay, start_worker):
    make_products(10)
    commands.run("ormbridge_resync", "shop.Product", "--chunk-size", "4")
    job = ResyncJob.objects.get()
    # interrupted (as Ctrl-C on --wait did) while the workers delivered its three chunks
    resync.interrupt(job, "interrupted")
    start_worker()
    wait_until(lambda: resync.rows_done(job) == 10, 60, "the workers to deliver the chunks")
    assert ResyncJob.objects.get().state == "interrupted"

    done = commands.run("ormbridge_resync", "--resume", str(job.pk), "--wait")
    assert done.returncode == 0, done.stderr
    lines = progress_lines(done.stderr)
    assert lines[-1] == "10 / 10 rows done (100%)"
    assert all(int(re.search(r"\((\d+)%\)", line)[1]) <= 100 for line in lines), lines


def run_on_terminals(*args: str) -> tuple[int, bytes, bytes]:
    """``manage.py <args>`` with stdout and stderr each on a pseudo-terminal of its own, as
    in an interactive shell; returns the exit status and the bytes written to each."""
    masters, slaves = zip(os.openpty(), os.openpty(), strict=True)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "ORMBRIDGE_TEST_DB_NAME": connection.settings_dict["NAME"],
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example")]),
        "TERM": "xterm",
    }
    env.pop("DJANGO_COLORS", None)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "example" / "manage.py"), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=slaves[0],
        stderr=slaves[1],
    )
    for slave in slaves:
        os.close(slave)
    received: list[bytearray] = [bytearray(), bytearray()]

    def drain(master: int, into: bytearray) -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the command closed its end
                return
            if not chunk:
                return
            into.extend(chunk)

    readers = [
        threading.Thread(target=drain, args=(master, into))
        for master, into in zip(masters, received, strict=True)
    ]
    for reader in readers:
        reader.start()
    returncode = process.wait(timeout=300)
    for reader in readers:
        reader.join(30)
    for master in masters:
        os.close(master)
    return returncode, bytes(received[0]), bytes(received[1])


def test_the_progress_bar_on_a_terminal_is_not_in_the_error_style(no_relay):
    make_products(2_000)
    returncode, stdout, stderr = run_on_terminals(
        "ormbridge_resync", "shop.Product", "--sync", "--chunk-size", "500"
    )
    assert returncode == 0, stderr
    assert b"done: 2,000 rows" in stdout
    assert b"replayed" in stderr and b"2.00k/2.00k" in stderr, stderr  # the bar, on stderr
    assert RED not in stderr, stderr


def test_ctrl_c_while_watching_stops_watching_and_the_workers_finish_the_job(
    no_relay, start_worker
):
    products = make_products(3_000)
    # 2 ms a replay: the workers need seconds for the 3,000 rows, time to interrupt the watch
    start_worker(env={"ORMBRIDGE_TEST_REPLAY_DELAY": "0.002"})
    command = commands.manage(
        "ormbridge_resync", "shop.Product", "--chunk-size", "500", "--wait", "--no-progress"
    )
    wait_until(
        lambda: ResyncJob.objects.filter(planned=True).exists() and len(replays.saves()) >= 600,
        60,
        "every chunk handed out and the first ones replayed",
    )
    command.send_signal(signal.SIGINT)
    _, stderr = command.communicate(timeout=60)
    assert command.returncode == 1
    job = ResyncJob.objects.get()
    assert stderr.strip().splitlines()[-1] == (
        f"CommandError: stopped watching resync job {job.pk}; the job goes on on the workers. "
        f"Follow it with manage.py ormbridge_status or --resume {job.pk} --wait."
    )
    wait_until(
        lambda: ResyncJob.objects.filter(pk=job.pk, state="done").exists(),
        60,
        "the workers to finish the job",
    )
    assert replays.saves() == {p.pk: 1 for p in products}
