"""manage.py ormbridge_resync: chunked, resumable, on workers or in its own process."""

import signal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from ormbridge import registry, relay, resync, tasks
from ormbridge.cache import cached_instance
from ormbridge.models import ChangeBatch, ResyncJob
from shop.models import Product
from tests import commands, replays
from tests.conftest import wait_until
from tests.factories import cached_entry, log_mark, logged_since, make_products
from tests.seconddb.models import Item

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]


def resync_command(*args: str) -> str:
    out = StringIO()
    call_command("ormbridge_resync", *args, "--no-progress", stdout=out, stderr=StringIO())
    return out.getvalue()


def test_an_async_resync_replays_every_row_once(worker):
    products = make_products(50_000)
    resync_command("shop.Product", "--wait", "--chunk-size", "10000")
    assert replays.saves() == {p.pk: 1 for p in products}
    assert replays.update_fields() == {None}
    job = ResyncJob.objects.get()
    assert (job.state, job.rows_total, resync.rows_done(job)) == ("done", 50_000, 50_000)


def test_a_sync_resync_needs_no_worker(no_relay):
    products = make_products(50_000)
    output = resync_command("shop.Product", "--sync", "--chunk-size", "10000")
    assert replays.saves() == {p.pk: 1 for p in products}
    assert "done: 50,000 rows" in output
    job = ResyncJob.objects.get()
    assert job.state == "done"
    # no relay runs: the command delivered its five chunks itself
    chunks = ChangeBatch.objects.filter(job=job)
    assert list(chunks.values_list("state", "rows")) == [("done", 10_000)] * 5


def test_async_chunks_are_left_pending_for_any_relay(no_relay):
    products = make_products(10)
    output = resync_command("shop.Product", "--chunk-size", "4")
    job = ResyncJob.objects.get()
    chunks = ChangeBatch.objects.filter(job=job).order_by("id")
    assert list(chunks.values_list("state", "rows", "replay")) == [
        ("pending", 4, True),
        ("pending", 4, True),
        ("pending", 2, True),
    ]
    assert replays.saves() == {}
    assert "on the workers" in output
    assert job.state == "running"

    assert relay.drain().failed == 0
    assert replays.saves() == {p.pk: 1 for p in products}
    job.refresh_from_db()
    assert (job.state, resync.rows_done(job)) == ("done", 10)


def test_invalidate_mode_replays_nothing_but_clears_caches(worker):
    products = make_products(300)
    for product in products[:10]:
        cached_instance(Product, product.pk)
    resync_command("shop.Product", "--mode", "invalidate", "--wait")
    assert replays.saves() == {}
    assert all(cached_entry("shop.product", p.pk) is None for p in products[:10])


def test_filters_and_excludes_choose_the_rows(no_relay):
    products = make_products(30)
    Product.objects.filter(pk__in=[p.pk for p in products[:10]]).update(stock=5)
    Product.objects.filter(pk=products[0].pk).update(name="skip me")
    resync_command("shop.Product", "--sync", "--filter", "stock__gte=5", "--exclude",
                   "name__startswith=skip")  # fmt: skip
    assert set(replays.saves()) == {p.pk for p in products[1:10]}


def test_pk_lookups_and_lists_are_converted(no_relay):
    products = make_products(10)
    first, second = products[0].pk, products[1].pk
    resync_command("shop.Product", "--sync", "--filter", f"pk__in={first},{second}")
    assert set(replays.saves()) == {first, second}


def test_dry_run_counts_and_changes_nothing(no_relay):
    make_products(12_345)
    mark = log_mark()
    output = resync_command("shop.Product", "--dry-run", "--chunk-size", "5000")
    assert "shop.product: 12,345 rows in 3 chunks of 5,000" in output
    assert not ResyncJob.objects.exists()
    assert not logged_since(mark).exists()


def test_a_second_job_on_the_same_model_is_refused(no_relay):
    make_products(10)
    running = resync.start(resync.select(["shop.Product"]))
    with pytest.raises(CommandError, match=f"resync job {running.pk} is running on shop.product"):
        resync_command("shop.Product", "--sync")
    resync_command("shop.Product", "--sync", "--force")
    assert ResyncJob.objects.count() == 2


def test_progress_is_printed_as_lines_when_not_a_terminal(no_relay):
    make_products(100)
    err = StringIO()
    call_command("ormbridge_resync", "shop.Product", "--sync", stdout=StringIO(), stderr=err)
    assert "100 / 100 rows replayed (100%)" in err.getvalue()


def test_no_progress_prints_nothing_on_stderr(no_relay):
    make_products(100)
    err = StringIO()
    call_command("ormbridge_resync", "shop.Product", "--sync", "--no-progress",
                 stdout=StringIO(), stderr=err)  # fmt: skip
    assert err.getvalue() == ""


def done_chunk_pks(job_id: int) -> set[int]:
    done = ChangeBatch.objects.filter(job_id=job_id, state="done")
    return {int(pk) for pks in done.values_list("pks", flat=True) for pk in pks}


def test_a_killed_sync_resync_is_finished_by_resume(no_relay):
    products = make_products(6_000)
    command = commands.manage(
        "ormbridge_resync", "shop.Product", "--sync", "--chunk-size", "1000", "--no-progress",
        env={"ORMBRIDGE_TEST_REPLAY_DELAY": "0.0005"},
    )  # fmt: skip
    wait_until(lambda: len(replays.saves()) >= 2_500, 60, "a few chunks to be replayed")
    command.send_signal(signal.SIGKILL)
    command.wait()
    job = ResyncJob.objects.get()
    assert job.state == "running"
    finished = done_chunk_pks(job.pk)
    assert 0 < len(finished) < 6_000

    resync_command("--resume", str(job.pk), "--sync")
    saves = replays.saves()
    assert set(saves) == {p.pk for p in products}
    assert all(saves[pk] == 1 for pk in finished)  # no finished chunk redone
    assert ResyncJob.objects.get().state == "done"


def test_a_job_whose_relay_was_killed_is_finished_by_resume(no_relay, start_worker):
    """Chunks the killed relay held are taken over once their lease (RELAY_LEASE) ran out."""
    products = make_products(6_000)
    victim = start_worker(env={"ORMBRIDGE_TEST_REPLAY_DELAY": "0.0005"})
    resync_command("shop.Product", "--chunk-size", "1000")
    wait_until(lambda: len(replays.saves()) >= 2_500, 60, "a few chunks to be replayed")
    victim.kill()
    job = ResyncJob.objects.get()
    finished = done_chunk_pks(job.pk)
    assert 0 < len(finished) < 6_000

    start_worker()
    resync_command("--resume", str(job.pk), "--wait")
    saves = replays.saves()
    assert set(saves) == {p.pk for p in products}
    assert all(saves[pk] == 1 for pk in finished)
    assert ResyncJob.objects.get().state == "done"


def test_ctrl_c_marks_the_job_interrupted_and_resume_finishes_it(no_relay):
    make_products(3_000)
    # 2 ms a replay: the last of the 3,000 is seconds after the first 600, time to interrupt.
    command = commands.manage(
        "ormbridge_resync", "shop.Product", "--sync", "--chunk-size", "500", "--no-progress",
        env={"ORMBRIDGE_TEST_REPLAY_DELAY": "0.002"},
    )  # fmt: skip
    wait_until(lambda: len(replays.saves()) >= 600, 60, "the first chunks")
    command.send_signal(signal.SIGINT)
    _, stderr = command.communicate(timeout=60)
    assert command.returncode == 1, stderr
    job = ResyncJob.objects.get()
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"CommandError: resync job {job.pk} stopped (interrupted; "), last
    assert last.endswith(f" rows done); continue it with --resume {job.pk}."), last
    assert job.state == "interrupted"
    resync_command("--resume", str(job.pk), "--sync")
    assert len(replays.saves()) == 3_000


BAD_ARGUMENTS = [
    (["shop.Nope"], "unknown model 'shop.Nope'"),
    (["auth.Group"], "auth.Group is not registered with ormbridge"),
    ([], "name models as app_label.Model, or pass --all"),
    (["shop.Product", "--filter", "colour=red"], "has no field 'colour'"),
    (["shop.Product", "--filter", "price__near=3"], "unknown lookup 'near' for field 'price'"),
    (["shop.Product", "--filter", "price__gte=cheap"], "price__gte='cheap' is not valid"),
    (["shop.Product", "--filter", "price"], "--filter takes FIELD__LOOKUP=VALUE"),
    (["shop.Product", "--chunk-size", "0"], "--chunk-size must be 1 or more"),
    (["shop.Product", "--chunk-size", "many"], "--chunk-size takes a whole number"),
    (["shop.Product", "--mode", "both"], "--mode must be replay or invalidate"),
    (["--resume", "424242"], "there is no resync job 424242"),
]


@pytest.mark.parametrize("arguments,message", BAD_ARGUMENTS)
def test_bad_input_exits_non_zero_with_one_line_and_changes_nothing(no_relay, arguments, message):
    make_products(5)
    mark = log_mark()
    done = commands.run("ormbridge_resync", *arguments)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("CommandError: ")
    assert message in lines[0]
    assert not ResyncJob.objects.exists()
    assert not logged_since(mark).exists()
    assert replays.saves() == {}


# Filters that pass the field checks but that the database (or its driver) refuses, some only
# when a row reaches them: each is refused up front, whatever the table holds.
REFUSED_BY_THE_DATABASE = [
    (["--filter", "name__regex=("], "--filter name__regex='(' is not a valid regular expression"),
    (["--exclude", "name__iregex=[a"], "--exclude name__iregex='[a' is not a valid regular"),
    # no tag exists: no row ever reaches the pattern
    (["--filter", "tags__name__regex=("], "--filter tags__name__regex='(' is not a valid regular"),
    (["--filter", "tags__regex=("], "Unsupported lookup 'regex'"),
    (["--filter", "stock=99999999999999999999"], "stock='99999999999999999999' is out of range"),
    (["--filter", "category=99999999999999999999"], "category='99999999999999999999' is out of"),
    (["--dry-run", "--filter", "sku__regex=)"], "--filter sku__regex=')' is not a valid regular"),
]


@pytest.mark.parametrize("arguments,message", REFUSED_BY_THE_DATABASE)
def test_a_filter_the_database_refuses_is_one_line_and_writes_nothing(no_relay, arguments, message):
    """Issue 10, operations 14: a traceback (DataError, EmptyResultSet, FieldError, ...)."""
    make_products(5)
    mark = log_mark()
    done = commands.run("ormbridge_resync", "shop.Product", *arguments)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("CommandError: shop.Product: ")
    assert message in lines[0]
    assert not ResyncJob.objects.exists()
    assert not logged_since(mark).exists()
    assert replays.saves() == {}


def test_help_documents_every_option_with_an_example():
    done = commands.run("ormbridge_resync", "--help")
    for option in ["--all", "--filter", "--exclude", "--chunk-size", "--mode", "--sync", "--wait",
                   "--dry-run", "--no-progress", "--resume", "--force"]:  # fmt: skip
        assert option in done.stdout
    assert "examples:" in done.stdout
    assert "manage.py ormbridge_resync --resume 12 --wait" in done.stdout


def test_resync_all_covers_every_registered_model(no_relay):
    products = make_products(5)
    resync_command("--all", "--sync")
    assert set(replays.saves()) == {p.pk for p in products}
    assert (
        set(ResyncJob.objects.get().labels)
        == {model._meta.label_lower for model in registry.registered_models()}
        >= {"shop.category", "shop.digitalproduct", "shop.product", "testapp.project"}
    )


TWO_DATABASES = pytest.mark.django_db(transaction=True, databases=["default", "other"])


@TWO_DATABASES
def test_a_sync_resync_of_a_model_in_a_second_database_replays_its_rows(second_database, no_relay):
    """Issue 17, item 9: the chunks went to "default"'s log and were replayed from there."""
    items = Item.objects.bulk_create(Item(name=f"item {n}") for n in range(25))
    assert Item.objects.db == "other"
    output = resync_command("seconddb.Item", "--sync", "--chunk-size", "10")
    assert "done: 25 rows" in output
    assert replays.saves("seconddb.item") == {item.pk: 1 for item in items}
    job = ResyncJob.objects.using("default").get()
    assert (job.state, resync.progress(job)) == ("done", (25, 25))
    chunks = ChangeBatch.objects.using("other").filter(job_id=job.pk)
    assert sorted(chunks.values_list("state", "rows")) == [("done", 5), ("done", 10), ("done", 10)]
    assert not ChangeBatch.objects.using("default").filter(job_id=job.pk).exists()


@TWO_DATABASES
def test_an_async_resync_over_both_databases_is_delivered_by_a_worker(
    second_database, no_relay, start_worker
):
    products = make_products(30)
    items = Item.objects.bulk_create(Item(name=f"item {n}") for n in range(30))
    start_worker()  # it sees both databases
    resync_command("shop.Product", "seconddb.Item", "--wait", "--chunk-size", "7")
    assert replays.saves() == {p.pk: 1 for p in products}
    assert replays.saves("seconddb.item") == {item.pk: 1 for item in items}
    job = ResyncJob.objects.get()
    assert (job.state, resync.progress(job)) == ("done", (60, 60))


class StaleReplicaRouter:
    """Reads of ormbridge's own tables go to "other", standing for a replica that lags:
    it has none of "default"'s rows."""

    def db_for_read(self, model, **hints):
        return "other" if model._meta.app_label == "ormbridge" else None


@pytest.fixture
def stale_replica(second_database, settings):
    settings.DATABASE_ROUTERS = [StaleReplicaRouter(), "tests.routers.SecondDatabaseRouter"]


@TWO_DATABASES
def test_finish_if_complete_reads_the_chunks_where_they_are_written(stale_replica, no_relay):
    """Issue 17, item 9: a read replica answered the completion query: the job was done
    while its chunk was still pending."""
    job = ResyncJob.objects.create(labels=["shop.product"], chunk_size=10, planned=True)
    chunk = ChangeBatch.objects.create(model="shop.product", action="update", pks=[1], rows=1,
                                       replay=True, job=job)  # fmt: skip
    assert (job._state.db, chunk._state.db) == ("default", "default")
    assert ResyncJob.finish_if_complete(job.pk) is False
    assert ResyncJob.objects.using("default").get(pk=job.pk).state == "running"
    ChangeBatch.objects.filter(pk=chunk.pk).update(state="done")
    assert ResyncJob.finish_if_complete(job.pk) is True
    assert ResyncJob.objects.using("default").get(pk=job.pk).state == "done"


@TWO_DATABASES
def test_resume_and_wait_read_the_job_where_it_is_written(stale_replica, no_relay):
    """The neighbours of finish_if_complete: the job to resume and its progress."""
    products = make_products(12)
    job = resync.start(resync.select(["shop.Product"]), chunk_size=5)
    output = resync_command("--resume", str(job.pk), "--sync")
    assert "done: 12 rows" in output
    assert replays.saves() == {p.pk: 1 for p in products}
    job = ResyncJob.objects.using("default").get(pk=job.pk)
    assert (job.state, resync.progress(job)) == ("done", (12, 12))


@TWO_DATABASES
def test_a_chunk_written_before_its_progress_is_not_planned_again(second_database, no_relay):
    """The model's log and the job are in two databases: a chunk commits before the
    progress that names it. A job stopped in between is resumed from that chunk."""
    items = Item.objects.bulk_create(Item(name=f"item {n}") for n in range(25))
    job = resync.start(resync.select(["seconddb.Item"]), chunk_size=10)
    first = sorted(item.pk for item in items)[:10]
    ChangeBatch.objects.using("other").create(model="seconddb.item", action="update", pks=first,
                                              rows=10, replay=True, job_id=job.pk)  # fmt: skip
    assert job.progress == {} and job.rows_planned == 0  # the stop came here
    resync_command("--resume", str(job.pk), "--sync")
    assert replays.saves("seconddb.item") == {item.pk: 1 for item in items}
    job = ResyncJob.objects.get(pk=job.pk)
    assert (job.state, job.rows_planned, resync.progress(job)) == ("done", 25, (25, 25))


def test_a_model_whose_database_holds_no_change_log_is_refused(settings):
    settings.DATABASE_ROUTERS = ["tests.routers.LogOnDefaultRouter"]
    with pytest.raises(resync.ResyncError) as refused:
        resync.select(["seconddb.Item"])
    assert "seconddb.Item's rows are in database 'other', which holds no change log" in str(
        refused.value
    )


@pytest.mark.parametrize("finished", ["done", "deleted"])
def test_resuming_a_finished_job_on_a_worker_is_a_no_op_said_in_one_line(worker, finished):
    """Issue 17, item 12: the admin's retry of a job that finished (or was deleted) while its
    task waited in the queue logged an ERROR with a traceback (``ResyncError``)."""
    make_products(5)
    job = resync.start(resync.select(["shop.Product"]))
    resync.run(job)
    resync.wait(job, poll=0.05)
    job_id = job.pk
    if finished == "deleted":
        job.delete()
    start = len(worker.log_text())
    task_id = tasks.enqueue(tasks.resume_resync, job_id)

    def ended() -> bool:
        text = worker.log_text()[start:]
        return f"[{task_id}] succeeded" in text or f"[{task_id}] raised" in text

    wait_until(ended, 60, "the worker to run the resume task")
    text = worker.log_text()[start:]
    assert f"[{task_id}] succeeded" in text, text
    assert "Traceback" not in text and "ERROR" not in text, text
    if finished == "done":
        assert f"INFO/MainProcess] ormbridge: resync job {job_id} is already done; " in text, text
        assert ResyncJob.objects.get(pk=job_id).state == "done"
    else:
        assert f"WARNING/MainProcess] ormbridge: there is no resync job {job_id}; " in text, text
