"""safe_bulk_*: chunked writes whose per-row signals are replayed by a real worker."""

import math
from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.db.models import Count, F, ProtectedError
from django.db.models.signals import post_delete

import ormbridge
from ormbridge import redis_store, relay, signals
from ormbridge.cache import cached_instance
from ormbridge.conf import settings as ormbridge_settings
from ormbridge.models import ChangeBatch
from shop.models import Category, Customer, Order, Product
from tests import emitters, replays
from tests.conftest import wait_until
from tests.factories import cached_entry, log_mark, logged_since, make_products, wait_delivered

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]


@pytest.fixture
def bulk_signals():
    """Every bulk signal sent in this process, as (name, sender label, pks, fields)."""
    sent = []
    names = [
        "pre_bulk_update",
        "post_bulk_update",
        "pre_bulk_delete",
        "post_bulk_delete",
        "post_bulk_create",
    ]

    def receiver(signal_name):
        def record(sender, pks, fields, using, **kwargs):
            sent.append((signal_name, sender._meta.label_lower, list(pks), fields))

        return record

    receivers = {name: receiver(name) for name in names}
    for name, function in receivers.items():
        getattr(signals, name).connect(function, weak=False)
    yield sent
    for name, function in receivers.items():
        getattr(signals, name).disconnect(function)


def table(model=Product) -> list[tuple]:
    return list(model.objects.order_by("pk").values_list())


def test_update_replays_one_post_save_per_matching_row(worker, bulk_signals):
    category = Category.objects.create(name="bulk")
    matching = make_products(20_000, category=category)
    others = make_products(2_000, category=category)
    Product.objects.filter(pk__in=[p.pk for p in others]).update(stock=5)
    wait_delivered()  # the setup's own change-log rows, so only the bulk update follows
    redis_store.get_redis().delete(emitters.events_key())
    sample = matching[::1000] + others[:20]
    for product in sample:
        cached_instance(Product, product.pk)

    mark = log_mark()
    result = ormbridge.safe_bulk_update(Product.objects.filter(stock=0), price=F("price") + 1)
    result.wait(timeout=120)

    assert result.rows == 20_000
    assert replays.saves() == {p.pk: 1 for p in matching}
    assert replays.update_fields() == {("price",)}
    assert replays.created_flags() == {False}
    assert set(Product.objects.filter(stock=0).values_list("price", flat=True)) == {Decimal(2)}
    assert set(Product.objects.filter(stock=5).values_list("price", flat=True)) == {Decimal(1)}
    pre = [s for s in bulk_signals if s[0] == "pre_bulk_update"]
    post = [s for s in bulk_signals if s[0] == "post_bulk_update"]
    assert len(pre) == len(post) == result.chunks > 1
    assert sorted(pk for s in post for pk in s[2]) == [p.pk for p in matching]
    assert {s[3] for s in post} == {frozenset({"price"})}
    assert all(cached_entry("shop.product", p.pk) is None for p in matching[::1000])
    assert all(cached_entry("shop.product", p.pk) is not None for p in others[:20])
    logged = list(logged_since(mark))
    assert [row.id for row in logged] == result.batch_ids  # the triggers logged nothing more
    events = [e for e in emitters.recorded() if e["model"] == "shop.product"]
    assert {(e["type"], tuple(e["fields"])) for e in events} == {("update", ("price",))}
    assert sorted(pk for e in events for pk in e["pks"]) == [p.pk for p in matching]
    # one event per chunk and DELIVERY_BATCH_SIZE rows, not per row
    per_event = int(ormbridge_settings.DELIVERY_BATCH_SIZE)
    assert len(events) == sum(math.ceil(row.rows / per_event) for row in logged) < 100


def test_delete_replays_post_delete_with_the_deleted_values(worker, bulk_signals):
    products = make_products(3_000)
    Product.objects.filter(pk__in=[p.pk for p in products[::2]]).update(name="doomed", stock=7)
    doomed = products[::2]
    customer = Customer.objects.create(email="a@example.com")
    orders = Order.objects.bulk_create(
        Order(product=p, customer=customer, quantity=3) for p in doomed[:50]
    )
    cached_instance(Product, doomed[0].pk)

    result = ormbridge.safe_bulk_delete(Product.objects.filter(name="doomed"), chunk_size=700)
    result.wait(timeout=120)

    assert result.rows == len(doomed) and result.chunks == 3
    assert not Product.objects.filter(name="doomed").exists()
    assert Product.objects.count() == len(products) - len(doomed)
    assert replays.deletes() == {p.pk: 1 for p in doomed}
    values = replays.deleted_values()
    assert {v["name"] for v in values.values()} == {"doomed"}
    assert {v["stock"] for v in values.values()} == {"7"}
    assert values[doomed[0].pk]["sku"] == doomed[0].sku
    assert replays.deletes("shop.order") == {o.pk: 1 for o in orders}  # cascaded, as delete()
    assert not Order.objects.exists()
    assert cached_entry("shop.product", doomed[0].pk) is None
    post = [s for s in bulk_signals if s[0] == "post_bulk_delete"]
    assert sorted(pk for s in post for pk in s[2]) == [p.pk for p in doomed]


def test_delete_applies_set_null_like_delete_does(worker):
    [product] = make_products(1)
    customers = Customer.objects.bulk_create(Customer(email=f"{n}@example.com") for n in range(3))
    orders = Order.objects.bulk_create(Order(product=product, customer=c) for c in customers)
    mark = log_mark()
    result = ormbridge.safe_bulk_delete(Customer.objects.all())
    result.wait(timeout=60)
    assert Order.objects.filter(customer__isnull=True).count() == 3
    assert replays.deletes("shop.customer") == {c.pk: 1 for c in customers}
    assert replays.saves("shop.order") == {}  # delete() sends no post_save for SET_NULL
    [nulled] = logged_since(mark, "shop.order")  # and the trigger logged nothing more
    assert (nulled.action, nulled.fields, sorted(nulled.pks)) == (
        "update",
        ["customer"],
        sorted(o.pk for o in orders),
    )


def test_a_protected_row_stops_the_delete_before_its_chunk(worker):
    books = Category.objects.create(name="books")
    make_products(3, category=books)
    Category.objects.bulk_create([Category(name="empty")])
    before = table(Category)
    mark = log_mark()
    with pytest.raises(ProtectedError):
        ormbridge.safe_bulk_delete(Category.objects.filter(name="books"))
    assert table(Category) == before
    assert not logged_since(mark).exists()


def test_create_replays_post_save_with_created(worker, bulk_signals):
    category = Category.objects.create(name="new")
    objs = [Product(sku=f"new-{n}", name="new", category=category, price=1) for n in range(5_000)]
    result = ormbridge.safe_bulk_create(Product, objs)
    result.wait(timeout=60)
    assert result.rows == 5_000
    assert all(obj.pk for obj in result.objects)
    assert replays.saves() == {obj.pk: 1 for obj in result.objects}
    assert replays.created_flags() == {True}
    assert replays.update_fields() == {None}
    created = [s for s in bulk_signals if s[0] == "post_bulk_create"]
    assert sorted(pk for s in created for pk in s[2]) == sorted(o.pk for o in result.objects)


def test_update_objects_replays_post_save_with_its_fields(worker, bulk_signals):
    products = make_products(5_000)
    for product in products[:10]:
        cached_instance(Product, product.pk)
    for n, product in enumerate(products):
        product.stock = n
    result = ormbridge.safe_bulk_update_objects(products, ["stock"], batch_size=1_000)
    result.wait(timeout=60)
    assert result.chunks == 5
    assert dict(Product.objects.values_list("pk", "stock")) == {
        p.pk: n for n, p in enumerate(products)
    }
    assert replays.saves() == {p.pk: 1 for p in products}
    assert replays.update_fields() == {("stock",)}
    assert all(cached_instance(Product, p.pk).stock == n for n, p in enumerate(products[:10]))


def test_sync_replay_runs_in_the_caller_after_commit(no_relay):
    products = make_products(300)
    mark = log_mark()
    result = ormbridge.safe_bulk_update(Product.objects.all(), replay="sync", stock=4)
    assert replays.saves() == {p.pk: 1 for p in products}
    # no relay runs: the caller delivered its chunks itself
    logged = logged_since(mark)
    assert list(logged.values_list("id", flat=True)) == result.batch_ids
    assert set(logged.values_list("state", flat=True)) == {"done"}
    result.wait(timeout=0)


def test_replay_none_invalidates_and_broadcasts_without_signals(worker):
    products = make_products(50)
    cached_instance(Product, products[0].pk)
    result = ormbridge.safe_bulk_update(Product.objects.all(), replay="none", stock=4)
    result.wait(timeout=30)
    assert replays.saves() == {}
    assert cached_instance(Product, products[0].pk).stock == 4
    [event] = [e for e in emitters.recorded() if e["type"] == "update"]
    assert (event["model"], event["fields"]) == ("shop.product", ["stock"])
    assert sorted(event["pks"]) == [p.pk for p in products]


def test_a_row_that_stops_matching_is_not_written():
    products = make_products(10)
    escaping = products[3]

    def escape(sender, pks, **kwargs):
        Product.objects.filter(pk=escaping.pk).update(stock=9)  # inside the chunk's transaction

    signals.pre_bulk_update.connect(escape, sender=Product)
    try:
        result = ormbridge.safe_bulk_update(
            Product.objects.filter(stock=0), replay="sync", name="x"
        )
    finally:
        signals.pre_bulk_update.disconnect(escape, sender=Product)
    assert result.rows == 9
    assert Product.objects.get(pk=escaping.pk).name == escaping.name
    assert escaping.pk not in replays.saves()


@pytest.fixture
def third_chunk_fails():
    """A pre_bulk_update receiver that raises on the third chunk."""
    calls = []

    def fail_third(sender, pks, **kwargs):
        calls.append(pks)
        if len(calls) == 3:
            raise RuntimeError("third chunk")

    signals.pre_bulk_update.connect(fail_third, sender=Product)
    yield
    signals.pre_bulk_update.disconnect(fail_third, sender=Product)


def test_atomic_rolls_back_every_chunk_on_failure(third_chunk_fails):
    make_products(50)
    before = table()
    mark = log_mark()
    with pytest.raises(RuntimeError, match="third chunk"):
        ormbridge.safe_bulk_update(Product.objects.all(), chunk_size=10, atomic=True, stock=1)
    assert table() == before
    assert not logged_since(mark).exists()


def test_without_atomic_finished_chunks_stay_committed(no_relay, third_chunk_fails):
    products = make_products(50)
    mark = log_mark()
    with pytest.raises(RuntimeError, match="third chunk"):
        ormbridge.safe_bulk_update(Product.objects.all(), chunk_size=10, stock=1)
    assert Product.objects.filter(stock=1).count() == 20
    logged = logged_since(mark)
    assert [(row.state, sorted(row.pks)) for row in logged] == [
        ("pending", [p.pk for p in products[:10]]),
        ("pending", [p.pk for p in products[10:20]]),
    ]


def test_with_the_broker_down_the_relay_still_delivers(worker, redis_servers):
    products = make_products(20)
    wait_delivered()  # the worker's relay runs (it starts once the worker reached the broker)
    redis_servers["broker"].stop()  # clean_redis starts it again after the test
    result = ormbridge.safe_bulk_update(Product.objects.all(), stock=3)
    result.wait(timeout=60)
    assert replays.saves() == {p.pk: 1 for p in products}


def test_wait_times_out_with_a_clear_message(no_relay):
    make_products(5)
    result = ormbridge.safe_bulk_update(Product.objects.all(), stock=3)
    with pytest.raises(TimeoutError, match=r"1 of 1 change batches of this shop\.Product"):
        result.wait(timeout=0.2)


def test_unregistered_models_need_allow_unregistered():
    from django.contrib.auth.models import Group

    Group.objects.bulk_create([Group(name="a"), Group(name="b")])
    with pytest.raises(LookupError, match="not registered with ormbridge"):
        ormbridge.safe_bulk_update(Group.objects.all(), name=F("name"))
    result = ormbridge.safe_bulk_update(
        Group.objects.filter(name="a"), replay="sync", allow_unregistered=True, name="c"
    )
    assert result.rows == 1
    assert sorted(Group.objects.values_list("name", flat=True)) == ["b", "c"]


BAD_UPDATES = [
    (lambda: Product.objects.all(), {"colour": "red"}, ValueError, "has no field 'colour'"),
    (lambda: Product.objects.all(), {"tags": 1}, ValueError, "not a concrete field"),
    (lambda: Product.objects.all(), {"id": 1}, ValueError, "primary key"),
    (lambda: Product.objects.all(), {"orders": 1}, ValueError, "reverse relation"),
    (lambda: Product.objects.all()[:5], {"stock": 1}, TypeError, "is sliced"),
    (
        lambda: Product.objects.all().union(Product.objects.all()),
        {"stock": 1},
        TypeError,
        "combined",
    ),
    (lambda: Product.objects.distinct(), {"stock": 1}, TypeError, "distinct"),
    (lambda: Product.objects.annotate(n=Count("orders")), {"stock": 1}, TypeError, "aggregated"),
    (lambda: Product.objects.all(), {"stock": F("nope")}, Exception, "nope"),
    (lambda: Product.objects.all(), {}, ValueError, "at least one field"),
]


@pytest.mark.parametrize("make_queryset,values,error,message", BAD_UPDATES)
def test_bad_update_input_fails_before_any_write(make_queryset, values, error, message):
    make_products(20)
    before = table()
    mark = log_mark()
    with pytest.raises(error, match=message):
        ormbridge.safe_bulk_update(make_queryset(), **values)
    assert table() == before
    assert not logged_since(mark).exists()


@pytest.mark.parametrize(
    "options,message",
    [
        ({"chunk_size": 0}, "whole number >= 1"),
        ({"chunk_size": -5}, "whole number >= 1"),
        ({"chunk_size": "10"}, "whole number >= 1"),
        ({"replay": "later"}, "replay must be one of"),
    ],
)
def test_bad_options_fail_before_any_write(options, message):
    make_products(20)
    before = table()
    mark = log_mark()
    with pytest.raises(ValueError, match=message):
        ormbridge.safe_bulk_update(Product.objects.all(), stock=1, **options)
    with pytest.raises(ValueError, match=message):
        ormbridge.safe_bulk_delete(Product.objects.all(), **options)
    assert table() == before
    assert not logged_since(mark).exists()


def test_bad_delete_querysets_fail_before_any_write():
    make_products(20)
    before = table()
    mark = log_mark()
    with pytest.raises(TypeError, match="is sliced"):
        ormbridge.safe_bulk_delete(Product.objects.all()[:3])
    assert table() == before
    assert not logged_since(mark).exists()


def test_mixed_models_fail_before_any_write():
    [product] = make_products(1)
    category = Category.objects.create(name="x")
    before = table(Category)
    mark = log_mark()
    with pytest.raises(TypeError, match="mixed models"):
        ormbridge.safe_bulk_create(Category, [Category(name="y"), product])
    with pytest.raises(TypeError, match="mixed models"):
        ormbridge.safe_bulk_update_objects([category, product], ["name"])
    assert table(Category) == before
    assert not logged_since(mark).exists()


def test_bad_update_objects_input_fails_before_any_write():
    products = make_products(3)
    before = table()
    mark = log_mark()
    with pytest.raises(ValueError, match="has no primary key"):
        ormbridge.safe_bulk_update_objects([*products, Product(sku="z")], ["stock"])
    with pytest.raises(ValueError, match="non-empty list"):
        ormbridge.safe_bulk_update_objects(products, "stock")
    with pytest.raises(ValueError, match="primary key"):
        ormbridge.safe_bulk_update_objects(products, ["id"])
    with pytest.raises(ValueError, match="no objects"):
        ormbridge.safe_bulk_update_objects([], ["stock"])
    assert table() == before
    assert not logged_since(mark).exists()


def test_bulk_signals_are_not_sent_by_plain_orm_calls(bulk_signals):
    make_products(3)
    Product.objects.update(stock=2)
    Product.objects.all().delete()
    assert bulk_signals == []


def test_post_signals_wait_for_the_callers_transaction(bulk_signals):
    make_products(3)
    with transaction.atomic():
        ormbridge.safe_bulk_update(Product.objects.all(), stock=2)
        assert [s[0] for s in bulk_signals] == ["pre_bulk_update"]
    assert [s[0] for s in bulk_signals] == ["pre_bulk_update", "post_bulk_update"]


def test_a_relay_killed_mid_replay_loses_nothing(no_relay, start_worker):
    """SIGKILL the worker while its relay replays; another relay takes the rows over
    once their lease ran out (RELAY_LEASE, 10 s)."""
    products = make_products(3_000)
    mark = log_mark()
    victim = start_worker(env={"ORMBRIDGE_TEST_REPLAY_DELAY": "0.002"})
    result = ormbridge.safe_bulk_update(Product.objects.all(), chunk_size=1_000, stock=1)
    wait_until(lambda: len(replays.saves()) >= 200, 30, "the replay to be under way")
    victim.kill()
    replayed = len(replays.saves())
    assert 0 < replayed < 3_000
    held = {
        row.id: row.claimed_by
        for row in logged_since(mark).filter(state="claimed")  # the victim's, lease running
    }
    assert held
    with pytest.raises(TimeoutError):
        result.wait(timeout=1.5)  # nobody is working on it: no progress

    start_worker()
    result.wait(timeout=60)
    saves = replays.saves()
    assert set(saves) == {p.pk for p in products}
    assert min(saves.values()) >= 1
    for row in logged_since(mark).filter(id__in=held):
        assert row.claimed_by != held[row.id]  # taken over by the new relay
        assert row.attempts == 2


HELPERS = {
    "safe_bulk_update": lambda: ormbridge.safe_bulk_update(
        Product.objects.all(), chunk_size=10, stock=F("stock") + 1
    ),
    "safe_bulk_delete": lambda: ormbridge.safe_bulk_delete(Product.objects.all(), chunk_size=10),
    "safe_bulk_create": lambda: ormbridge.safe_bulk_create(
        Product,
        [
            Product(sku=f"new-{n}", name="new", category=Category.objects.get(), price=1)
            for n in range(35)
        ],
        batch_size=10,
    ),
    "safe_bulk_update_objects": lambda: ormbridge.safe_bulk_update_objects(
        [Product(pk=pk, stock=7) for pk in Product.objects.values_list("pk", flat=True)],
        ["stock"],
        batch_size=10,
    ),
}
ACTIONS = {
    "safe_bulk_update": "update",
    "safe_bulk_delete": "delete",
    "safe_bulk_create": "create",
    "safe_bulk_update_objects": "update",
}


@pytest.mark.parametrize("helper", list(HELPERS))
def test_each_chunk_writes_one_change_log_row_and_the_triggers_none(no_relay, helper):
    existing = [] if helper == "safe_bulk_create" else make_products(35)
    if not existing:
        Category.objects.create(name="default")
    mark = log_mark()
    result = HELPERS[helper]()
    assert (result.rows, result.chunks) == (35, 4)
    logged = list(logged_since(mark))
    assert [row.id for row in logged] == result.batch_ids
    assert [(row.model, row.action, row.state) for row in logged] == [
        ("shop.product", ACTIONS[helper], "pending")
    ] * 4
    assert [row.rows for row in logged] == [10, 10, 10, 5]
    pks = [pk for row in logged for pk in row.pks]
    written = existing or result.objects
    assert sorted(pks) == sorted(p.pk for p in written)


@pytest.mark.parametrize("helper", list(HELPERS))
def test_each_helper_is_delivered_by_the_relay(worker, helper):
    existing = [] if helper == "safe_bulk_create" else make_products(35)
    if not existing:
        Category.objects.create(name="default")
    mark = log_mark()
    result = HELPERS[helper]()
    result.wait(timeout=60)
    logged = logged_since(mark)
    assert list(logged.values_list("id", flat=True)) == result.batch_ids
    assert set(logged.values_list("state", flat=True)) == {"done"}
    written = existing or result.objects
    if helper == "safe_bulk_delete":
        assert replays.deletes() == {p.pk: 1 for p in written}
    else:
        assert replays.saves() == {p.pk: 1 for p in written}


def test_a_delete_of_rows_nothing_references_logs_no_empty_batch(no_relay):
    """Order.customer is SET_NULL: with no order pointing at the customers nothing is nulled,
    and nothing is logged for Order (an empty row was: issue 10, operations 11)."""
    customers = Customer.objects.bulk_create(Customer(email=f"{n}@example.com") for n in range(3))
    relay.drain()
    mark = log_mark()
    result = ormbridge.safe_bulk_delete(Customer.objects.all())
    logged = [(row.model, row.action, sorted(row.pks)) for row in logged_since(mark)]
    assert logged == [("shop.customer", "delete", [c.pk for c in customers])]
    relay.drain()
    result.wait(timeout=5)


def test_a_delivered_delete_keeps_no_deleted_values(worker):
    """Security 5 (issue 10): deleted rows' values leave the change log once delivered."""
    make_products(5)
    result = ormbridge.safe_bulk_delete(Product.objects.all())
    result.wait(timeout=60)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(*) FROM {ChangeBatch._meta.db_table} "
            f"WHERE id IN ({', '.join(map(str, result.batch_ids))}) AND snapshot IS NOT NULL"
        )
        assert cursor.fetchone() == (0,)


def test_a_delete_retried_for_a_failing_receiver_keeps_only_that_rows_values(no_relay):
    products = make_products(5)
    victim = products[2]

    def refuse(sender, instance, **kwargs):
        if instance.pk == victim.pk:
            raise ValueError("refused")

    post_delete.connect(refuse, sender=Product)
    try:
        result = ormbridge.safe_bulk_delete(Product.objects.all())
        relay.drain()
    finally:
        post_delete.disconnect(refuse, sender=Product)
    [batch] = ChangeBatch.objects.filter(id__in=result.batch_ids)
    pk_at = batch.snapshot["fields"].index("id")
    assert [row[pk_at] for row in batch.snapshot["rows"]] == [victim.pk]
    assert (batch.state, batch.retry_pks) == ("pending", [victim.pk])
