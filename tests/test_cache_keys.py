"""Two reads share a cache entry only when everything that decides their result is the same
(issue 16, items 1 to 3): keys are built by one type-strict encoder, never from ``repr()``.

The database tests cache a read, then make another read that differs only in a value whose
``repr()`` used to hide the difference (psycopg cuts a ``Jsonb`` after ~35 characters; an
expression's or a memoryview's repr holds an address CPython reuses); it must get its own
rows. The Hypothesis tests state the encoder's property over generated values.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import gc
import json
import zoneinfo
from typing import Any

import pytest
from django.db import connection
from django.db.models import Count, Exists, F, Field, OuterRef, Q, Subquery, Sum, Value
from django.template import Context, Template, TemplateSyntaxError
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext
from hypothesis import given, settings
from hypothesis import strategies as st

import ormbridge
from ormbridge import keys, redis_store, relay, stats
from ormbridge.compiled import aggregate_key, compile_queryset
from shop.models import Category, Customer, Order, Product
from tests.factories import make_products
from tests.testapp.models import Document

pytestmark = [pytest.mark.databases, pytest.mark.redis]

postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="JSON containment (contains=) is PostgreSQL's"
)

# Two owners whose JSON is as long and starts alike for longer than psycopg's repr shows.
ALICE = "customer-000000000000000000000-alice"
BOB = "customer-000000000000000000000-bobby"


def documents() -> tuple[Document, Document]:
    alice = Document.objects.create(title="alice's salary 1", data={"owner": ALICE})
    bob = Document.objects.create(title="bob's salary 2", data={"owner": BOB})
    relay.drain()
    return alice, bob


def titles(queryset: Any) -> list[str]:
    return [document.title for document in queryset]


# -- item 1: JSON and binary parameters


@postgresql_only
@pytest.mark.django_db(transaction=True)
def test_json_containment_filters_of_two_owners_never_share_an_entry(no_relay):
    documents()
    assert titles(Document.objects.cache().filter(data__contains={"owner": ALICE})) == [
        "alice's salary 1"
    ]
    assert titles(Document.objects.cache().filter(data__contains={"owner": BOB})) == [
        "bob's salary 2"
    ]


@pytest.mark.django_db(transaction=True)
def test_json_key_filters_of_two_owners_never_share_an_entry(no_relay):
    documents()
    for owner, title in [(ALICE, "alice's salary 1"), (BOB, "bob's salary 2")]:
        rows = ormbridge.cached_queryset(Document.objects.filter(data__owner=owner))
        assert titles(rows) == [title]


@pytest.mark.django_db(transaction=True)
def test_binary_filters_never_share_an_entry(no_relay):
    Document.objects.create(title="abc", blob=b"abc")
    Document.objects.create(title="def", blob=b"def")
    relay.drain()
    for blob in [b"abc", b"def", b"abc", b"def"]:
        gc.collect()  # a freed memoryview's address is the next one's
        assert titles(Document.objects.cache().filter(blob=blob)) == [blob.decode()]


class Point:
    """A parameter type the encoder does not know (the drivers are taught to send it)."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __str__(self) -> str:
        return f"({self.x},{self.y})"

    def __conform__(self, protocol: object) -> str:  # sqlite3's adaptation protocol
        return str(self)


@pytest.fixture
def point_parameters() -> None:
    """This test's database connection sends a ``Point`` as text."""
    if connection.vendor == "postgresql":
        from psycopg.types.string import StrDumper

        class PointDumper(StrDumper):
            def dump(self, obj: Any) -> Any:
                return super().dump(str(obj))

        connection.ensure_connection()
        connection.connection.adapters.register_dumper(Point, PointDumper)


@pytest.mark.django_db(transaction=True)
def test_a_parameter_of_a_type_the_encoder_does_not_know_is_read_through_and_counted(
    no_relay, point_parameters
):
    make_products(1)
    relay.drain()
    for _ in range(2):
        at = Value(Point(1, 2), output_field=Field())  # a field that sends it as it is
        with CaptureQueriesContext(connection) as queries:
            [row] = Product.objects.cache().annotate(at=at)
        assert row.at == "(1,2)"
        assert len(queries.captured_queries) == 1
    stats.counts.send()
    counted = redis_store.get_redis().hget(
        redis_store.stats_key("shop.product"), "uncached:unkeyable"
    )
    assert counted == "2"


# -- item 2: aggregates holding expressions


@pytest.mark.django_db(transaction=True)
def test_cached_aggregates_with_exists_count_each_customers_own_products(no_relay):
    products = make_products(15)
    customers = [Customer.objects.create(email=f"c{n}@example.com") for n in range(15)]
    for n, customer in enumerate(customers):
        Order.objects.bulk_create(
            Order(product=product, customer=customer) for product in products[: n + 1]
        )
    relay.drain()
    counted = []
    for customer in customers:
        ordered = Exists(Order.objects.filter(customer=customer, product=OuterRef("pk")))
        counted.append(Product.objects.cache().aggregate(n=Count("pk", filter=Q(ordered)))["n"])
    assert counted == list(range(1, 16))


@pytest.mark.django_db(transaction=True)
def test_cached_aggregates_over_subqueries_of_other_values_have_their_own_entries(no_relay):
    products = make_products(3)
    relay.drain()
    for product in [*products, *products]:
        price = Subquery(Product.objects.filter(pk=product.pk).values("pk")[:1])
        assert Product.objects.cache().aggregate(pk=Sum(price))["pk"] == 3 * product.pk


# -- item 3: functions and fragments


@pytest.mark.django_db(transaction=True)
def test_cached_as_refuses_a_request_and_says_what_to_pass(no_relay):
    @ormbridge.cached_as(Product)
    def dashboard(request: Any) -> str:
        return request.user.username

    with pytest.raises(TypeError, match=r"argument 1 is a WSGIRequest.*request\.user\.pk"):
        dashboard(RequestFactory().get("/dashboard/"))


@pytest.mark.django_db(transaction=True)
def test_cached_as_refuses_an_arbitrary_object(no_relay):
    @ormbridge.cached_as(Product)
    def describe(thing: Any) -> str:
        return str(thing)

    with pytest.raises(TypeError, match=r"argument 1 is a object, which has no exact key"):
        describe(object())


@pytest.mark.django_db(transaction=True)
def test_cached_as_keys_positional_and_named_arguments_apart(no_relay):
    @ormbridge.cached_as(Product)
    def price(amount: int, *args: Any, **kwargs: Any) -> str:
        return f"{amount} {args} {kwargs}"

    assert price(1, currency="USD") == "1 () {'currency': 'USD'}"
    assert price(1, ("currency", "USD")) == "1 (('currency', 'USD'),) {}"


@pytest.mark.django_db(transaction=True)
def test_cached_as_keys_an_instance_apart_from_text_that_looks_like_it(no_relay):
    [product] = make_products(1)

    @ormbridge.cached_as(Product)
    def kind(thing: Any) -> str:
        return type(thing).__name__

    assert kind(product) == "Product"
    assert kind(f"<shop.product pk={product.pk!r}>") == "str"


@pytest.mark.django_db(transaction=True)
def test_cached_as_keys_equal_arguments_of_other_types_apart(no_relay):
    @ormbridge.cached_as(Product)
    def kind(thing: Any) -> str:
        return type(thing).__name__

    assert [kind(1), kind(1.0), kind(True), kind("1"), kind(decimal.Decimal(1))] == [
        "int",
        "float",
        "bool",
        "str",
        "Decimal",
    ]


def render(source: str, **context: Any) -> str:
    return Template("{% load ormbridge %}" + source).render(Context(context))


@pytest.mark.django_db(transaction=True)
def test_the_tag_keys_each_queryset_source_apart(no_relay):
    Category.objects.create(name="apple")
    Category.objects.create(name="banana")
    relay.drain()
    fragment = '{% cached_as found None "search" %}{{ found|join:"," }}{% endcached_as %}'

    def search(q: str) -> str:
        found = Category.objects.filter(name__startswith=q).order_by("name")
        return render(fragment, found=found)

    assert search("a") == "apple"
    assert search("b") == "banana"


@pytest.mark.django_db(transaction=True)
def test_the_tag_keys_vary_on_values_apart_however_they_split(no_relay):
    make_products(1)
    fragment = '{% cached_as products None "page" a b %}{{ a }}|{{ b }}{% endcached_as %}'
    assert render(fragment, products=Product.objects.all(), a="p:", b="q") == "p:|q"
    assert render(fragment, products=Product.objects.all(), a="p", b=":q") == "p|:q"


@pytest.mark.django_db(transaction=True)
def test_the_tag_refuses_a_vary_on_value_it_cannot_key(no_relay):
    fragment = '{% cached_as products None "page" thing %}x{% endcached_as %}'
    with pytest.raises(TemplateSyntaxError, match="has no exact key"):
        render(fragment, products=Product.objects.all(), thing=object())


# -- the encoder


class Colour(enum.Enum):
    RED = 1
    ONE = "1"


@pytest.mark.unit
def test_the_encoder_refuses_a_type_it_does_not_know_naming_it():
    with pytest.raises(keys.Unkeyable, match=r"builtins\.object value at \[1\]"):
        keys.encode([1, object()])


@pytest.mark.unit
def test_the_encoder_refuses_an_unsaved_instance():
    with pytest.raises(keys.Unkeyable, match=r"shop\.models\.Product"):
        keys.encode(Product(name="unsaved"))


@pytest.mark.unit
def test_the_encoder_encodes_a_psycopg_jsonb_in_full():
    jsonb = pytest.importorskip("psycopg.types.json").Jsonb
    assert keys.encode(jsonb({"owner": ALICE})) != keys.encode(jsonb({"owner": BOB}))
    assert keys.encode(jsonb({"owner": ALICE})) == keys.encode(jsonb({"owner": ALICE}))


@pytest.mark.unit
def test_the_encoder_tells_a_naive_datetime_from_an_aware_one():
    naive = datetime.datetime(2026, 12, 7, 9, 0)
    aware = naive.replace(tzinfo=datetime.UTC)
    assert keys.encode(naive) != keys.encode(aware)


UTC_OR_ZONE = st.one_of(
    st.none(),
    st.just(datetime.UTC),
    st.sampled_from(["Europe/Paris", "America/New_York", "Asia/Kolkata"]).map(zoneinfo.ZoneInfo),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.dates(),
    st.datetimes(timezones=UTC_OR_ZONE),
    st.times(),
    st.timedeltas(),
    st.uuids(),
    st.sampled_from(Colour),
)
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=40)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=40), inner, max_size=3)
    ),
    max_leaves=6,
)
MODELS = st.builds(
    lambda model, pk: model(pk=pk),
    st.sampled_from([Product, Category, Customer]),
    st.integers(1, 3),
)


def jsonb(value: Any) -> Any:
    from psycopg.types.json import Jsonb

    return Jsonb(value)


VALUES = st.recursive(
    st.one_of(SCALARS, MODELS, JSON.map(jsonb)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=5), inner, max_size=4),
        st.frozensets(st.one_of(st.integers(), st.text(max_size=5)), max_size=4),
    ),
    max_leaves=12,
)


def identity(value: Any) -> Any:
    """What tells two values apart for a key: their type, their exact value (a Decimal's
    digits, a datetime's offset) and, for containers, their items in order."""
    if isinstance(value, enum.Enum):
        return ("enum", type(value), value.value)
    if isinstance(value, Product | Category | Customer):
        return ("model", type(value), value.pk)
    if type(value).__name__ == "Jsonb":
        return ("jsonb", json.dumps(value.obj))  # the JSON text the driver sends
    if isinstance(value, list | tuple):
        return (type(value), tuple(identity(item) for item in value))
    if isinstance(value, dict):
        return (dict, tuple((identity(k), identity(v)) for k, v in value.items()))
    if isinstance(value, frozenset):
        return (frozenset, frozenset(identity(item) for item in value))
    if isinstance(value, decimal.Decimal):
        return (decimal.Decimal, str(value))
    if isinstance(value, float):
        return (float, repr(value))
    if isinstance(value, datetime.datetime):
        return (datetime.datetime, value.isoformat())
    return (type(value), value)


@pytest.mark.unit
@settings(max_examples=400, deadline=None)
@given(VALUES, VALUES)
def test_two_values_share_an_encoding_only_when_they_are_the_same_value(a, b):
    assert (keys.encode(a) == keys.encode(b)) == (identity(a) == identity(b))


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(st.lists(VALUES, max_size=3), st.dictionaries(st.text(max_size=3), VALUES, max_size=3))
def test_positional_arguments_never_share_a_key_with_named_ones(args, kwargs):
    positional = keys.digest("func", "f", tuple(args) + tuple(kwargs.items()), ())
    named = keys.digest("func", "f", tuple(args), tuple(sorted(kwargs.items())))
    assert positional != named or not kwargs


# -- queries built from generated filters: distinct queries, distinct keys

FIELDS = st.sampled_from(["name", "sku", "stock", "price"])
EQUALITIES = st.one_of(
    st.tuples(st.just("eq"), st.sampled_from(["name", "sku"]), st.text(max_size=4)),
    st.tuples(st.just("eq"), st.just("stock"), st.integers(-3, 3)),
    st.tuples(
        st.just("eq"),
        st.just("price"),
        st.decimals(min_value=-5, max_value=5, places=2, allow_nan=False),
    ),
)
LEAVES = st.one_of(
    EQUALITIES,
    st.tuples(st.just("f"), FIELDS, FIELDS),
    st.tuples(st.just("exists"), st.integers(0, 3)),
    st.tuples(st.just("subquery"), st.integers(0, 3)),
)
FILTERS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.tuples(st.just("and"), inner, inner),
        st.tuples(st.just("or"), inner, inner),
        st.tuples(st.just("not"), inner),
    ),
    max_leaves=5,
)


def as_q(spec: tuple[Any, ...]) -> Q:
    """The Q a generated filter stands for; distinct specs give distinct SQL or params."""
    match spec:
        case ("eq", field, value):
            return Q(**{field: value})
        case ("f", field, other):
            return Q(**{f"{field}__gt": F(other)})
        case ("exists", quantity):
            orders = Order.objects.filter(product=OuterRef("pk"), quantity=quantity)
            return Q(Exists(orders))
        case ("subquery", quantity):
            orders = Order.objects.filter(product=OuterRef("pk"), quantity=quantity)
            return Q(stock=Subquery(orders.values("quantity")[:1]))
        case ("and", left, right):
            return as_q(left) & as_q(right)
        case ("or", left, right):
            return as_q(left) | as_q(right)
        case ("not", inner):
            return ~as_q(inner)
    raise AssertionError(spec)


def query_key(spec: tuple[Any, ...]) -> bytes | None:
    compiled = compile_queryset(Product.objects.filter(as_q(spec)))
    return None if compiled is None else keys.encode(compiled.key)


def sql_of(spec: tuple[Any, ...]) -> tuple[str, tuple[bytes, ...]] | None:
    compiled = compile_queryset(Product.objects.filter(as_q(spec)))
    if compiled is None:
        return None
    return compiled.sql, tuple(keys.encode(param) for param in compiled.params)


@pytest.mark.django_db
@settings(max_examples=150, deadline=None)
@given(FILTERS, FILTERS)
def test_two_querysets_share_a_key_only_when_their_sql_and_parameters_are_the_same(a, b):
    key_a, key_b = query_key(a), query_key(b)
    gc.collect()  # addresses of the first query's objects are free for the second's
    assert (key_a == key_b) == (sql_of(a) == sql_of(b))
    assert query_key(a) == key_a  # the same query, built again, has the same key


@pytest.mark.django_db
@settings(max_examples=100, deadline=None)
@given(st.integers(0, 5), st.integers(0, 5))
def test_aggregates_over_exists_of_other_values_have_other_keys(a, b):
    def key(quantity: int) -> bytes:
        orders = Order.objects.filter(product=OuterRef("pk"), quantity=quantity)
        parts, _ = aggregate_key(
            Product.objects.all(), (), {"n": Count("pk", filter=Q(Exists(orders)))}
        )
        return keys.encode(parts)

    first = key(a)
    gc.collect()
    assert (first == key(b)) == (a == b)
