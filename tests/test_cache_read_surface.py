"""Django's ORM read surface through the cache (issue 16, item 10).

Every shape of read Django's ORM offers is either cached correctly or refused with a
reason. *Cached correctly* is one test per shape of ``SHAPES`` (a ``Shape`` per kind of
read, named by its id):

- after two reads (the first may only learn which tables its load reads) a third is
  served without a query, and equals what plain Django returns for the same read;
- then, one after the other, a committed change to a row of each model the read depends
  on (the main model, the joined, related, prefetched or filtered-relation model, an m2m
  table through ``add()``/``remove()``): each is chosen to show in the result, which the
  test checks first; the next read through the cache equals plain Django's, and the one
  after it is served from the cache again.

Reads that differ only in a parameter (a window's partition, a JSON key, an array value,
a time zone, a slice) each get their own rows: one test per case of ``PARAMETERS``.

*Refused* reads go to the database every time and are counted ``uncached:<reason>`` in
the model's statistics, with a message that says why and what to do. No relay runs: the
setup's change log is delivered by ``relay.drain()`` before the first cached read, so only
the commit-time invalidation of the change under test can make a read miss.
"""

from __future__ import annotations

import datetime
import itertools
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from django.apps import apps
from django.contrib.contenttypes.models import ContentType
from django.db import connection, models, transaction
from django.db.models import (
    Case,
    Count,
    DecimalField,
    Exists,
    ExpressionWrapper,
    F,
    FilteredRelation,
    IntegerField,
    OuterRef,
    Prefetch,
    Q,
    Subquery,
    Sum,
    Value,
    When,
    Window,
)
from django.db.models.expressions import RawSQL
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Cast, Coalesce, Lower, Now, Random, Rank, RowNumber
from django.test.utils import CaptureQueriesContext

import ormbridge
from ormbridge import redis_store, relay
from ormbridge.compiled import compile_queryset
from ormbridge.loads import Uncacheable
from ormbridge.querysets import CachedQuerySet
from shop.models import Category, Customer, DiscountedProduct, Note, Order, Product, Tag
from tests.testapp.models import Document, Profile

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]
POSTGRESQL = connection.vendor == "postgresql"
postgresql_only = pytest.mark.skipif(
    not POSTGRESQL,
    reason="ArrayField and HStoreField are PostgreSQL's (tests.pgapp is installed there only)",
)

UTC = datetime.UTC
PARIS = zoneinfo.ZoneInfo("Europe/Paris")


def stats(label: str) -> dict[str, str]:
    from ormbridge import stats as counters

    counters.counts.send()
    return redis_store.get_redis().hgetall(redis_store.stats_key(label))


def read_twice(read: Callable[[], Any]) -> Any:
    """``read()`` twice: the first may only learn which tables its load reads."""
    read()
    return read()


def cached(model: type[models.Model]) -> models.QuerySet[Any]:
    """All rows of ``model``, read through the cache."""
    return CachedQuerySet(model).cache()


def plain(model: type[models.Model]) -> models.QuerySet[Any]:
    """All rows of ``model``, read by plain Django."""
    return model._default_manager.all()


Objects = Callable[[type[models.Model]], models.QuerySet[Any]]


def gadget() -> type[models.Model]:
    """tests.pgapp's model, installed on PostgreSQL only."""
    return apps.get_model("pgapp", "Gadget")


# -- the data every shape reads


def make_world() -> SimpleNamespace:
    """Two categories, three tags, four products, two customers (one with a profile),
    four orders (one without a customer), two notes, three documents, three gadgets
    (PostgreSQL); delivered before the test's first cached read."""
    w = SimpleNamespace()
    w.books, w.games = Category.objects.bulk_create(
        [Category(name="books", slug="books"), Category(name="games", slug="games")]
    )
    w.red, w.green, w.blue = Tag.objects.bulk_create(
        [Tag(name="red"), Tag(name="green"), Tag(name="blue")]
    )
    w.apple, w.banana, w.cherry, w.damson = Product.objects.bulk_create(
        [
            Product(sku="a", name="apple", category=w.books, price=Decimal("3.00"), stock=5),
            Product(sku="b", name="Banana", category=w.books, price=Decimal("1.00"), stock=2),
            Product(sku="c", name="cherry", category=w.games, price=Decimal("2.00"), stock=7),
            Product(sku="d", name="damson", category=w.games, price=Decimal("4.00"), stock=1),
        ]
    )
    Product.tags.through.objects.bulk_create(
        [
            Product.tags.through(product=w.apple, tag=w.red),
            Product.tags.through(product=w.apple, tag=w.green),
            Product.tags.through(product=w.banana, tag=w.red),
            Product.tags.through(product=w.cherry, tag=w.blue),
        ]
    )
    w.alice, w.bob = Customer.objects.bulk_create(
        [Customer(email="alice@example.com"), Customer(email="bob@example.com")]
    )
    Profile.objects.create(customer=w.alice, nickname="ali")
    w.orders = Order.objects.bulk_create(
        [
            Order(product=w.apple, customer=w.alice, quantity=1),
            Order(product=w.apple, customer=w.bob, quantity=3, status="paid"),
            Order(product=w.banana, customer=None, quantity=2),
            Order(product=w.cherry, customer=w.alice, quantity=1, status="shipped"),
        ]
    )
    created = [
        datetime.datetime(2024, 1, 1, 23, 30, tzinfo=UTC),  # 2 January in Paris
        datetime.datetime(2024, 1, 2, 10, 0, tzinfo=UTC),
        datetime.datetime(2024, 1, 5, 8, 0, tzinfo=UTC),
        datetime.datetime(2024, 2, 10, 23, 30, tzinfo=UTC),  # 11 February in Paris
    ]
    for order, when in zip(w.orders, created, strict=True):
        Order.objects.filter(pk=order.pk).update(created_at=when)
    product_type = ContentType.objects.get_for_model(Product)
    w.notes = Note.objects.bulk_create(
        [
            Note(content_type=product_type, object_id=w.apple.pk, text="fresh"),
            Note(content_type=product_type, object_id=w.cherry.pk, text="ripe"),
        ]
    )
    w.memo, w.letter, w.draft = Document.objects.bulk_create(
        [
            Document(title="memo", data={"owner": "alice", "a": {"b": 1}}),
            Document(title="letter", data={"owner": "bob", "a": {"b": 2}}),
            Document(title="draft", data={"note": "unsigned"}),
        ]
    )
    if POSTGRESQL:
        w.gadgets = gadget()._default_manager.bulk_create(
            [
                gadget()(name="g0", labels=["a", "b"], specs={"color": "red", "size": "L"}),
                gadget()(name="g1", labels=["c"], specs={"color": "blue"}),
                gadget()(name="g2", labels=[], specs={}),
            ]
        )
    relay.drain()
    return w


@pytest.fixture
def world(no_relay: None) -> SimpleNamespace:
    return make_world()


# -- committed changes, one model (or m2m table) each


def save(instance: models.Model, **values: Any) -> None:
    for name, value in values.items():
        setattr(instance, name, value)
    instance.save()


CHANGES: dict[str, Callable[[SimpleNamespace], None]] = {
    "product_renamed": lambda w: save(w.apple, name="zucchini"),
    "product_repriced": lambda w: save(w.banana, price=Decimal("5.00")),
    "category_renamed": lambda w: save(w.books, name="novels"),
    "tag_renamed": lambda w: save(w.red, name="crimson"),
    "tag_added": lambda w: w.damson.tags.add(w.red, w.blue),
    "tag_removed": lambda w: w.banana.tags.remove(w.red),
    "order_changed": lambda w: save(w.orders[0], quantity=5, status="paid"),
    "order_added": lambda w: Order.objects.create(product=w.damson, customer=w.bob, quantity=4),
    "order_given_a_customer": lambda w: save(w.orders[2], customer=w.bob),
    "order_moved": lambda w: save(
        w.orders[0], created_at=datetime.datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    ),
    "customer_changed": lambda w: save(w.alice, email="zoe@example.com"),
    "profile_changed": lambda w: Profile.objects.filter(customer=w.alice).update(nickname="al"),
    "profile_added": lambda w: Profile.objects.create(customer=w.bob, nickname="bobby"),
    "note_edited": lambda w: save(w.notes[0], text="bruised"),
    "document_changed": lambda w: save(w.draft, data={"owner": "alice", "a": {"b": 1}}),
    "gadget_relabelled": lambda w: save(w.gadgets[2], labels=["c", "a"]),
    "gadget_respecced": lambda w: save(w.gadgets[2], specs={"color": "red", "size": "S"}),
}


# -- the shapes


@dataclass(frozen=True)
class Shape:
    """A kind of read: ``read(objects, world)`` reads it through ``objects`` (``cached``
    or ``plain``) and returns its result as plain values; ``changes`` name the changes
    (of ``CHANGES``) that show in it, at least one per model it reads."""

    id: str
    read: Callable[[Objects, SimpleNamespace], Any]
    changes: tuple[str, ...]
    marks: tuple[Any, ...] = field(default=())


def related(o: Objects, manager: Any) -> models.QuerySet[Any]:
    """The rows of a related manager, read through the cache (``o`` is ``cached``) or not."""
    return manager.cache() if o is cached else manager.all()


def names(products: Any) -> list[str]:
    return [p.name for p in products]


def tag_names(product: Any) -> list[str]:
    return sorted(t.name for t in product.tags.all())


def big_orders(o: Objects, at_least: int = 2) -> models.QuerySet[Any]:
    condition = Q(orders__quantity__gte=at_least)
    return o(Product).annotate(big=FilteredRelation("orders", condition=condition))


def ranked(o: Objects, partition: str = "category") -> models.QuerySet[Any]:
    rank = Window(Rank(), partition_by=F(partition), order_by=F("price").desc())
    return o(Product).annotate(rank=rank)


def profile_of(customer: Any) -> str | None:
    profile = getattr(customer, "profile", None)  # a missing one raises an AttributeError
    return None if profile is None else profile.nickname


def deferred(instance: models.Model) -> list[str]:
    return sorted(instance.get_deferred_fields())


SHAPES = [
    # FilteredRelation, with a condition on the related model
    Shape(
        "filtered_relation",
        lambda o, w: list(
            big_orders(o)
            .filter(big__isnull=False)
            .values_list("name", "big__quantity")
            .order_by("name", "big__quantity")
        ),
        ("product_renamed", "order_changed"),
    ),
    # window functions
    Shape(
        "window_rank",
        lambda o, w: list(ranked(o).order_by("pk").values_list("name", "rank")),
        ("product_repriced", "product_renamed"),
    ),
    Shape(
        "window_row_number",
        lambda o, w: list(
            o(Order)
            .annotate(n=Window(RowNumber(), order_by=[F("quantity").desc(), F("pk").asc()]))
            .order_by("pk")
            .values_list("n", flat=True)
        ),
        ("order_changed", "order_added"),
    ),
    Shape(
        "window_filtered",
        lambda o, w: list(ranked(o).filter(rank=1).order_by("pk").values_list("name", flat=True)),
        ("product_renamed", "product_repriced"),
    ),
    # values() / values_list() over an m2m
    Shape(
        "values_list_over_m2m",
        lambda o, w: list(
            o(Product).values_list("name", "tags__name").order_by("pk", "tags__name")
        ),
        ("product_renamed", "tag_renamed", "tag_added", "tag_removed"),
    ),
    Shape(
        "values_over_reverse_m2m",
        lambda o, w: list(o(Tag).values("name", "products__name").order_by("pk", "products__pk")),
        ("tag_renamed", "product_renamed", "tag_added", "tag_removed"),
    ),
    Shape(
        "values_list_flat_over_m2m",
        lambda o, w: list(
            o(Product).values_list("tags__name", flat=True).order_by("pk", "tags__pk")
        ),
        ("tag_renamed", "tag_added"),
    ),
    Shape(
        "values_list_named",
        lambda o, w: [
            (type(row).__name__, row._asdict())
            for row in o(Product).values_list("name", "category__name", named=True).order_by("pk")
        ],
        ("product_renamed", "category_renamed"),
    ),
    # dates() / datetimes()
    Shape(
        "dates",
        lambda o, w: list(o(Order).dates("created_at", "day")),
        ("order_moved", "order_added"),
    ),
    Shape(
        "datetimes_in_a_time_zone",
        lambda o, w: list(o(Order).datetimes("created_at", "day", tzinfo=PARIS)),
        ("order_moved",),
    ),
    # select_related through a nullable foreign key and a reverse one-to-one
    Shape(
        "select_related_nullable_fk",
        lambda o, w: [
            (order.quantity, order.customer and order.customer.email)
            for order in o(Order).select_related("customer").order_by("pk")
        ],
        ("order_changed", "customer_changed", "order_given_a_customer"),
    ),
    Shape(
        "select_related_reverse_one_to_one",
        lambda o, w: [
            (customer.email, profile_of(customer))
            for customer in o(Customer).select_related("profile").order_by("pk")
        ],
        ("customer_changed", "profile_changed", "profile_added"),
    ),
    Shape(
        "select_related_nullable_fk_then_reverse_one_to_one",
        lambda o, w: [
            (order.pk, order.customer and (order.customer.email, profile_of(order.customer)))
            for order in o(Order).select_related("customer__profile").order_by("pk")
        ],
        ("order_given_a_customer", "profile_changed", "profile_added"),
    ),
    Shape(
        "select_related_without_fields",  # every non-null foreign key, and theirs
        lambda o, w: [
            (order.quantity, order.product.name, order.product.category.name)
            for order in o(Order).select_related().order_by("pk")
        ],
        ("order_changed", "product_renamed", "category_renamed"),
    ),
    Shape(
        "select_related_filtered_relation",  # Django sets no attribute for a missing row
        lambda o, w: [
            (order.quantity, getattr(order, "buyer", None) and order.buyer.email)
            for order in o(Order)
            .annotate(
                buyer=FilteredRelation("customer", condition=Q(customer__email__startswith="a"))
            )
            .select_related("buyer")
            .order_by("pk")
        ],
        ("order_changed", "customer_changed"),
    ),
    # only() / defer()
    Shape(
        "only",
        lambda o, w: [
            (p.name, p.price, deferred(p)) for p in o(Product).only("name", "price").order_by("pk")
        ],
        ("product_renamed", "product_repriced"),
    ),
    Shape(
        "defer_across_select_related",
        lambda o, w: [
            (p.name, p.category.name, deferred(p), deferred(p.category))
            for p in o(Product)
            .select_related("category")
            .defer("sku", "stock", "category__slug")
            .order_by("pk")
        ],
        ("product_renamed", "category_renamed"),
    ),
    # alias()
    Shape(
        "alias_filter",
        lambda o, w: list(
            o(Product)
            .alias(n=Count("orders"))
            .filter(n__gte=1)
            .order_by("pk")
            .values_list("name", flat=True)
        ),
        ("product_renamed", "order_added"),
    ),
    # expressions in order_by
    Shape(
        "order_by_desc_nulls_last",
        lambda o, w: list(
            o(Order)
            .order_by(F("customer__email").desc(nulls_last=True), "pk")
            .values_list("pk", flat=True)
        ),
        ("order_given_a_customer", "customer_changed"),
    ),
    Shape(
        "order_by_lower_across_a_join",
        lambda o, w: list(
            o(Product)
            .order_by(Lower("category__name").desc(), Lower("name"))
            .values_list("name", flat=True)
        ),
        ("product_renamed", "category_renamed"),
    ),
    # JSON key transforms
    Shape(
        "json_key",
        lambda o, w: names_of(o(Document).filter(data__owner="alice")),
        ("document_changed",),
    ),
    Shape(
        "json_nested_key",
        lambda o, w: names_of(o(Document).filter(data__a__b=1)),
        ("document_changed",),
    ),
    Shape(
        "json_has_key",
        lambda o, w: names_of(o(Document).filter(data__has_key="owner")),
        ("document_changed",),
    ),
    Shape(
        "json_key_text_transform",
        lambda o, w: list(
            o(Document)
            .annotate(owner=KeyTextTransform("owner", "data"))
            .order_by("pk")
            .values_list("title", "owner")
        ),
        ("document_changed",),
    ),
    Shape(
        "json_key_in_values_list",
        lambda o, w: list(o(Document).order_by("pk").values_list("data__a__b", flat=True)),
        ("document_changed",),
    ),
    # ArrayField and HStoreField lookups (PostgreSQL)
    *(
        Shape(name, read, changes, (postgresql_only,))
        for name, read, changes in [
            (
                "array_contains",
                lambda o, w: names_of(o(gadget()).filter(labels__contains=["a"])),
                ("gadget_relabelled",),
            ),
            (
                "array_overlap",
                lambda o, w: names_of(o(gadget()).filter(labels__overlap=["a", "c"])),
                ("gadget_relabelled",),
            ),
            (
                "array_len",
                lambda o, w: names_of(o(gadget()).filter(labels__len=2)),
                ("gadget_relabelled",),
            ),
            (
                "array_index",
                lambda o, w: names_of(o(gadget()).filter(labels__0="c")),
                ("gadget_relabelled",),
            ),
            (
                "hstore_has_key",
                lambda o, w: names_of(o(gadget()).filter(specs__has_key="size")),
                ("gadget_respecced",),
            ),
            (
                "hstore_contains",
                lambda o, w: names_of(o(gadget()).filter(specs__contains={"color": "red"})),
                ("gadget_respecced",),
            ),
            (
                "hstore_key",
                lambda o, w: names_of(o(gadget()).filter(specs__color="red")),
                ("gadget_respecced",),
            ),
        ]
    ),
    # every prefetch shape
    Shape(
        "prefetch_reverse_fk",
        lambda o, w: [
            (p.name, sorted(order.quantity for order in p.orders.all()))
            for p in o(Product).prefetch_related("orders").order_by("pk")
        ],
        ("product_renamed", "order_changed", "order_added"),
    ),
    Shape(
        "prefetch_m2m_forward",
        lambda o, w: [
            (p.name, tag_names(p)) for p in o(Product).prefetch_related("tags").order_by("pk")
        ],
        ("product_renamed", "tag_renamed", "tag_added", "tag_removed"),
    ),
    Shape(
        "prefetch_m2m_reverse",
        lambda o, w: [
            (t.name, sorted(names(t.products.all())))
            for t in o(Tag).prefetch_related("products").order_by("pk")
        ],
        ("tag_renamed", "product_renamed", "tag_added", "tag_removed"),
    ),
    Shape(
        "prefetch_with_a_filtered_queryset",
        lambda o, w: [
            (p.name, [t.name for t in p.tags.all()])
            for p in o(Product)
            .prefetch_related(
                Prefetch(
                    "tags", queryset=Tag.objects.filter(name__in=["red", "blue"]).order_by("pk")
                )
            )
            .order_by("pk")
        ],
        ("product_renamed", "tag_renamed", "tag_added"),
    ),
    Shape(
        "prefetch_to_attr",
        lambda o, w: [
            (p.name, [order.quantity for order in p.big_orders])
            for p in o(Product)
            .prefetch_related(
                Prefetch(
                    "orders",
                    queryset=Order.objects.filter(quantity__gte=2).order_by("pk"),
                    to_attr="big_orders",
                )
            )
            .order_by("pk")
        ],
        ("product_renamed", "order_changed"),
    ),
    Shape(
        "prefetch_nested",
        lambda o, w: [
            (p.name, [(t.name, sorted(names(t.products.all()))) for t in p.tags.all()])
            for p in o(Product).prefetch_related("tags__products").order_by("pk")
        ],
        ("product_renamed", "tag_renamed", "tag_added"),
    ),
    Shape(
        "prefetch_generic_relation",
        lambda o, w: [
            (p.name, [note.text for note in p.notes.all()])
            for p in o(Product).prefetch_related("notes").order_by("pk")
        ],
        ("product_renamed", "note_edited"),
    ),
    Shape(
        "prefetch_generic_foreign_key",
        lambda o, w: [
            (note.text, type(note.subject).__name__, note.subject.name)
            for note in o(Note).prefetch_related("subject").order_by("pk")
        ],
        ("note_edited", "product_renamed"),
    ),
    Shape(
        "prefetch_on_a_proxy",
        lambda o, w: [
            (type(p).__name__, p.name, tag_names(p))
            for p in o(DiscountedProduct).prefetch_related("tags").order_by("pk")
        ],
        ("product_renamed", "tag_renamed", "tag_added"),
    ),
    Shape(
        "prefetch_of_a_proxy",
        lambda o, w: [
            (t.name, [(type(p).__name__, p.name) for p in t.products.all()])
            for t in o(Tag)
            .prefetch_related(
                Prefetch("products", queryset=DiscountedProduct.objects.order_by("pk"))
            )
            .order_by("pk")
        ],
        ("tag_renamed", "product_renamed", "tag_added"),
    ),
    Shape(
        "prefetch_after_select_related",
        lambda o, w: [
            (order.quantity, order.product.name, tag_names(order.product))
            for order in o(Order)
            .select_related("product")
            .prefetch_related("product__tags")
            .order_by("pk")
        ],
        ("order_changed", "product_renamed", "tag_renamed"),
    ),
    Shape(
        "prefetch_forward_nullable_fk",
        lambda o, w: [
            (order.pk, order.customer and order.customer.email)
            for order in o(Order).prefetch_related("customer").order_by("pk")
        ],
        ("order_given_a_customer", "customer_changed"),
    ),
    Shape(
        "prefetch_reverse_one_to_one",
        lambda o, w: [
            (customer.email, profile_of(customer))
            for customer in o(Customer).prefetch_related("profile").order_by("pk")
        ],
        ("customer_changed", "profile_changed", "profile_added"),
    ),
    Shape(
        "prefetch_with_select_related_inside",
        lambda o, w: [
            (
                p.name,
                [(order.quantity, order.customer and order.customer.email) for order in p.in_order],
            )
            for p in o(Product)
            .prefetch_related(
                Prefetch(
                    "orders",
                    queryset=Order.objects.select_related("customer").order_by("pk"),
                    to_attr="in_order",
                )
            )
            .order_by("pk")
        ],
        ("product_renamed", "order_changed", "customer_changed"),
    ),
    Shape(
        "prefetch_sliced",  # Django filters on a window function per product
        lambda o, w: [
            (p.name, [order.quantity for order in p.top])
            for p in o(Product)
            .prefetch_related(
                Prefetch(
                    "orders", queryset=Order.objects.order_by("-quantity", "pk")[:1], to_attr="top"
                )
            )
            .order_by("pk")
        ],
        ("order_changed", "order_added", "product_renamed"),
    ),
    Shape(
        "prefetch_on_a_values_queryset",  # Django leaves it out for dicts: so does the cache
        lambda o, w: list(o(Product).values("name").prefetch_related("tags").order_by("pk")),
        ("product_renamed",),
    ),
    # combined queries
    Shape(
        "union_of_values_lists",
        lambda o, w: list(
            o(Category).values_list("name").union(Tag.objects.values_list("name")).order_by("name")
        ),
        ("category_renamed", "tag_renamed"),
    ),
    # count() and exists()
    Shape(
        "count_over_m2m",
        lambda o, w: o(Product).filter(tags__name="red").count(),
        ("tag_added", "tag_removed", "tag_renamed"),
    ),
    Shape(
        "count_distinct_over_m2m",
        lambda o, w: o(Product).filter(tags__name__in=["red", "blue"]).distinct().count(),
        ("tag_added", "tag_renamed"),
    ),
    Shape(
        "count_over_json_key",
        lambda o, w: o(Document).filter(data__owner="alice").count(),
        ("document_changed",),
    ),
    Shape(
        "exists_over_a_filtered_relation",
        lambda o, w: big_orders(o, at_least=5).filter(big__isnull=False).exists(),
        ("order_changed",),
    ),
    Shape(
        "exists_over_a_reverse_one_to_one",
        lambda o, w: o(Customer).filter(profile__isnull=True).exists(),
        ("profile_added",),
    ),
    Shape(
        "exists_over_a_window_filter",
        # Under an OR, the price is tested after the ranking (as a window's own condition).
        lambda o, w: ranked(o).filter(Q(rank=1, price__gte=5) | Q(rank__lt=0)).exists(),
        ("product_repriced",),
    ),
    Shape(
        "contains",
        lambda o, w: o(Product).filter(tags__name="red").contains(w.damson),
        ("tag_added",),
    ),
    # grouping, reversing, DISTINCT ON, subqueries in filters
    Shape(
        "values_annotate_group_by",
        lambda o, w: list(o(Order).values("status").annotate(n=Sum("quantity")).order_by("status")),
        ("order_changed", "order_added"),
    ),
    Shape(
        "reverse",
        lambda o, w: list(o(Product).order_by("price").reverse().values_list("name", flat=True)),
        ("product_repriced", "product_renamed"),
    ),
    Shape(
        "distinct_on",
        lambda o, w: list(
            o(Order)
            .order_by("product", "-quantity")
            .distinct("product")
            .values_list("product__name", "quantity")
        ),
        ("order_changed", "product_renamed"),
        (pytest.mark.skipif(not POSTGRESQL, reason="DISTINCT ON is PostgreSQL's"),),
    ),
    Shape(
        "exists_filter_through_a_join",
        lambda o, w: names_of(
            o(Product).filter(
                Exists(
                    Order.objects.filter(product=OuterRef("pk"), customer__email__startswith="a")
                )
            )
        ),
        ("product_renamed", "customer_changed"),
    ),
    Shape(
        "values_list_over_a_generic_relation",
        lambda o, w: list(o(Product).values_list("name", "notes__text").order_by("pk")),
        ("note_edited", "product_renamed"),
    ),
    # related managers (whose model's default manager is a CachedManager)
    Shape(
        "reverse_fk_related_manager",
        lambda o, w: [
            (p.name, p.price, p.category is w.books)
            for p in related(o, w.books.products).order_by("pk")
        ],
        ("product_renamed", "product_repriced"),
    ),
    Shape(
        "m2m_related_manager",
        lambda o, w: names(related(o, w.red.products).order_by("pk")),
        ("tag_added", "tag_removed", "product_renamed"),
    ),
    # get() on a unique field that is not the pk
    Shape(
        "get_by_a_unique_field",
        lambda o, w: (lambda p: (p.pk, p.name))(o(Product).get(sku="a")),
        ("product_renamed",),
    ),
    Shape(
        "get_by_pk_with_select_related",
        lambda o, w: (lambda order: (order.quantity, order.customer.email))(
            o(Order).select_related("customer").get(pk=w.orders[0].pk)
        ),
        ("order_changed", "customer_changed"),
    ),
    Shape(
        "get_by_pk_of_values_across_a_join",
        lambda o, w: o(Product).values("name", "category__name").get(pk=w.apple.pk),
        ("product_renamed", "category_renamed"),
    ),
    # slicing and distinct()
    Shape(
        "slice_first_two",
        lambda o, w: names(o(Product).order_by("name", "pk")[:2]),
        ("product_renamed",),
    ),
    Shape(
        "slice_two_to_four",
        lambda o, w: names(o(Product).order_by("name", "pk")[2:4]),
        ("product_renamed",),
    ),
    Shape(
        "distinct_over_m2m",
        lambda o, w: list(
            o(Product)
            .filter(tags__name__in=["red", "green"])
            .distinct()
            .order_by("pk")
            .values_list("name", flat=True)
        ),
        ("product_renamed", "tag_added", "tag_removed"),
    ),
    Shape("none", lambda o, w: list(o(Product).none()), ()),
    # in_bulk()
    Shape(
        "in_bulk",
        lambda o, w: {
            pk: p.name for pk, p in o(Product).in_bulk([w.apple.pk, w.banana.pk]).items()
        },
        ("product_renamed",),
    ),
    Shape(
        "in_bulk_by_a_unique_field",
        lambda o, w: {
            sku: p.name for sku, p in o(Product).in_bulk(["a", "c"], field_name="sku").items()
        },
        ("product_renamed",),
    ),
    # first() / last() / earliest() / latest()
    Shape(
        "first",
        lambda o, w: o(Product).order_by("price").first().name,
        ("product_repriced",),
    ),
    Shape(
        "last",
        lambda o, w: o(Product).order_by("price").last().name,
        ("product_repriced",),
    ),
    Shape(
        "earliest",
        lambda o, w: o(Order).earliest("created_at").pk,
        ("order_moved",),
    ),
    Shape(
        "latest",
        lambda o, w: o(Order).latest("created_at").pk,
        ("order_moved",),
    ),
    # aggregates and annotations
    Shape(
        "aggregate_with_filter_and_distinct",
        lambda o, w: o(Product).aggregate(
            tags=Count("tags", distinct=True, filter=Q(price__gte=3)),
            paid=Sum("orders__quantity", filter=Q(orders__status="paid")),
            prices=Sum("price", distinct=True),
        ),
        ("tag_added", "order_changed", "product_repriced"),
    ),
    Shape(
        "count_distinct_over_two_joins",
        lambda o, w: list(
            o(Product)
            .annotate(tags_n=Count("tags", distinct=True), orders_n=Count("orders", distinct=True))
            .order_by("pk")
            .values_list("tags_n", "orders_n")
        ),
        ("tag_added", "tag_removed", "order_added"),
    ),
    Shape(
        "subquery_outerref",
        lambda o, w: list(
            o(Product)
            .annotate(
                least=Subquery(
                    Order.objects.filter(product=OuterRef("pk"))
                    .order_by("quantity", "pk")
                    .values("quantity")[:1]
                ),
                ordered=Exists(Order.objects.filter(product=OuterRef("pk"))),
            )
            .order_by("pk")
            .values_list("least", "ordered")
        ),
        ("order_changed", "order_added"),
    ),
    Shape(
        "case_when",
        lambda o, w: list(
            o(Product)
            .annotate(kind=Case(When(price__gte=3, then=Value("dear")), default=Value("cheap")))
            .order_by("pk")
            .values_list("kind", flat=True)
        ),
        ("product_repriced",),
    ),
    Shape(
        "coalesce",
        lambda o, w: list(
            o(Order)
            .annotate(who=Coalesce("customer__email", Value("nobody")))
            .order_by("pk")
            .values_list("who", flat=True)
        ),
        ("customer_changed", "order_given_a_customer"),
    ),
    Shape(
        "cast",
        lambda o, w: list(
            o(Product)
            .annotate(whole=Cast("price", IntegerField()))
            .order_by("pk")
            .values_list("whole", flat=True)
        ),
        ("product_repriced",),
    ),
    Shape(
        "expression_wrapper",
        lambda o, w: list(
            o(Product)
            .annotate(
                worth=ExpressionWrapper(
                    F("price") * F("stock"),
                    output_field=DecimalField(max_digits=12, decimal_places=2),
                )
            )
            .order_by("pk")
            .values_list("worth", flat=True)
        ),
        ("product_repriced",),
    ),
]


def names_of(queryset: models.QuerySet[Any]) -> list[str]:
    """Titles or names of ``queryset``'s rows, in pk order."""
    field_name = "title" if queryset.model is Document else "name"
    return list(queryset.order_by("pk").values_list(field_name, flat=True))


def shape_params(shapes: list[Shape]) -> list[Any]:
    return [pytest.param(shape, id=shape.id, marks=shape.marks) for shape in shapes]


# -- cached correctly


def assert_served_from_the_cache(shape: Shape, world: SimpleNamespace, expected: Any) -> None:
    """A read of ``shape`` runs no query and returns ``expected``."""
    with CaptureQueriesContext(connection) as queries:
        hit = shape.read(cached, world)
    assert queries.captured_queries == [], f"{shape.id} was not served from the cache"
    assert hit == expected


@pytest.mark.parametrize("shape", shape_params(SHAPES))
def test_a_read_is_cached_and_fresh_after_a_change_to_each_model_it_reads(world, shape):
    expected = shape.read(plain, world)
    assert read_twice(lambda: shape.read(cached, world)) == expected
    assert_served_from_the_cache(shape, world, expected)
    for change in shape.changes:
        CHANGES[change](world)
        after = shape.read(plain, world)
        assert after != expected, f"{change} does not show in {shape.id}: it proves nothing"
        assert shape.read(cached, world) == after, f"{shape.id} is stale after {change}"
        shape.read(cached, world)
        assert_served_from_the_cache(shape, world, after)
        expected = after


# -- other parameters, other rows


@dataclass(frozen=True)
class Parameters:
    """A read with a parameter (``read(objects, world, value)``), and values of it whose
    results differ."""

    id: str
    read: Callable[[Objects, SimpleNamespace, Any], Any]
    values: tuple[Any, ...]
    marks: tuple[Any, ...] = field(default=())


def ranked_by_price_band(o: Objects, w: SimpleNamespace, bound: str) -> list[Any]:
    band = Case(When(price__gte=Decimal(bound), then=Value(1)), default=Value(0))
    rank = Window(Rank(), partition_by=band, order_by=F("price").desc())
    return list(o(Product).annotate(rank=rank).order_by("pk").values_list("rank", flat=True))


def with_key_text(o: Objects, w: SimpleNamespace, key: str) -> list[Any]:
    texts = o(Document).annotate(text=KeyTextTransform(key, "data"))
    return list(texts.order_by("pk").values_list("text", flat=True))


PARAMETERS = [
    Parameters(
        "window_partition",
        lambda o, w, by: list(ranked(o, by).order_by("pk").values_list("rank", flat=True)),
        ("category", "name"),
    ),
    Parameters("window_partition_value", ranked_by_price_band, ("2.00", "3.00")),
    Parameters(
        "filtered_relation_condition",
        lambda o, w, n: list(
            big_orders(o, at_least=n).filter(big__isnull=False).values_list("name", "big__pk")
        ),
        (2, 3),
    ),
    Parameters(
        "json_key_value",
        lambda o, w, owner: names_of(o(Document).filter(data__owner=owner)),
        ("alice", "bob"),
    ),
    Parameters(
        "json_nested_key_value",
        lambda o, w, b: names_of(o(Document).filter(data__a__b=b)),
        (1, 2),
    ),
    Parameters(
        "json_has_key",
        lambda o, w, key: names_of(o(Document).filter(data__has_key=key)),
        ("owner", "note"),
    ),
    Parameters("json_key_text_transform", with_key_text, ("owner", "note")),
    Parameters(
        "datetimes_time_zone",
        lambda o, w, zone: list(o(Order).datetimes("created_at", "day", tzinfo=zone)),
        (UTC, PARIS),
    ),
    Parameters(
        "dates_kind",
        lambda o, w, kind: list(o(Order).dates("created_at", kind)),
        ("day", "month"),
    ),
    Parameters(
        "slice",
        lambda o, w, bounds: names(o(Product).order_by("name", "pk")[slice(*bounds)]),
        ((0, 2), (2, 4)),
    ),
    Parameters(
        "get_by_a_unique_field",
        lambda o, w, sku: o(Product).get(sku=sku).name,
        ("a", "b"),
    ),
    *(
        Parameters(name, read, values, (postgresql_only,))
        for name, read, values in [
            (
                "array_contains",
                lambda o, w, v: names_of(o(gadget()).filter(labels__contains=v)),
                (["a"], ["c"]),
            ),
            (
                "array_overlap",
                lambda o, w, v: names_of(o(gadget()).filter(labels__overlap=v)),
                (["a", "x"], ["c", "x"]),
            ),
            ("array_len", lambda o, w, n: names_of(o(gadget()).filter(labels__len=n)), (1, 2)),
            (
                "array_index",
                lambda o, w, i: names_of(o(gadget()).filter(**{f"labels__{i}": "b"})),
                (0, 1),
            ),
            (
                "hstore_has_key",
                lambda o, w, key: names_of(o(gadget()).filter(specs__has_key=key)),
                ("size", "color"),
            ),
            (
                "hstore_contains",
                lambda o, w, v: names_of(o(gadget()).filter(specs__contains=v)),
                ({"color": "red"}, {"color": "blue"}),
            ),
            (
                "hstore_key",
                lambda o, w, v: names_of(o(gadget()).filter(specs__color=v)),
                ("red", "blue"),
            ),
        ]
    ),
]


@pytest.mark.parametrize(
    "case", [pytest.param(case, id=case.id, marks=case.marks) for case in PARAMETERS]
)
def test_reads_that_differ_in_a_parameter_get_their_own_rows(world, case):
    expected = [case.read(plain, world, value) for value in case.values]
    assert all(a != b for a, b in itertools.pairwise(expected)), "the values must differ"
    for value, rows in zip(case.values, expected, strict=True):
        assert read_twice(lambda value=value: case.read(cached, world, value)) == rows
    for value, rows in zip(case.values, expected, strict=True):
        with CaptureQueriesContext(connection) as queries:
            assert case.read(cached, world, value) == rows, f"{case.id}={value!r}"
        assert queries.captured_queries == [], f"{case.id}={value!r} was not served from the cache"


# -- only() and defer(): the deferred fields


def test_a_deferred_field_of_a_cached_instance_is_loaded_by_a_query_of_its_own(world):
    def read() -> list[Product]:
        return list(Product.objects.cache().only("name").order_by("pk"))

    read_twice(read)
    save(world.apple, stock=9)  # a change to a deferred field alone kills the entry too
    read_twice(read)
    with CaptureQueriesContext(connection) as queries:
        apple = read()[0]
    assert queries.captured_queries == [], "the cached part was not served from the cache"
    plain_apple = Product.objects.only("name").get(pk=world.apple.pk)
    assert (apple.name, deferred(apple)) == ("apple", deferred(plain_apple))
    assert "stock" in deferred(apple)
    with CaptureQueriesContext(connection) as queries:
        assert apple.stock == 9
    assert len(queries.captured_queries) == 1  # Django's own refresh_from_db()


# -- cached_queryset(): the function form


def through(o: Objects, queryset: models.QuerySet[Any]) -> Any:
    """``queryset`` read by ``cached_queryset()`` (``o`` is ``cached``) or by Django."""
    return ormbridge.cached_queryset(queryset) if o is cached else queryset


@pytest.mark.parametrize(
    "shape",
    shape_params(
        [
            Shape(
                "nested_prefetch",
                lambda o, w: [
                    (t.name, [(p.name, [n.text for n in p.notes.all()]) for p in t.products.all()])
                    for t in through(
                        o, Tag.objects.prefetch_related("products__notes").order_by("pk")
                    )
                ],
                (),
            ),
            Shape(
                "reverse_one_to_one",
                lambda o, w: [
                    (c.email, profile_of(c))
                    for c in through(o, Customer.objects.select_related("profile").order_by("pk"))
                ],
                (),
            ),
        ]
    ),
)
def test_cached_queryset_serves_a_read_from_the_cache(world, shape):
    expected = shape.read(plain, world)
    assert read_twice(lambda: shape.read(cached, world)) == expected
    assert_served_from_the_cache(shape, world, expected)


# -- refused: always read from the database, counted with the reason


def sql_of(queries: CaptureQueriesContext) -> list[str]:
    return [query["sql"] for query in queries.captured_queries]


def test_select_for_update_always_reads_the_database(world):
    with transaction.atomic():
        for _ in range(2):
            with CaptureQueriesContext(connection) as queries:
                assert len(Product.objects.cache().select_for_update().order_by("pk")) == 4
            assert len(queries.captured_queries) == 1
            assert not POSTGRESQL or "FOR UPDATE" in sql_of(queries)[0]
    assert stats("shop.product")["uncached:select_for_update"] == "2"


def test_a_get_by_pk_with_select_for_update_locks_the_row_every_time(world):
    with transaction.atomic():
        for _ in range(3):
            with CaptureQueriesContext(connection) as queries:
                product = Product.objects.cache().select_for_update().get(pk=world.apple.pk)
            assert product.name == "apple"
            assert len(queries.captured_queries) == 1, "served from the cache: no lock taken"
            assert not POSTGRESQL or "FOR UPDATE" in sql_of(queries)[0]
    assert stats("shop.product")["uncached:select_for_update"] == "3"


def test_a_random_order_always_reads_the_database(world):
    for _ in range(2):
        with CaptureQueriesContext(connection) as queries:
            assert len(Product.objects.cache().order_by("?")) == 4
        assert len(queries.captured_queries) == 1
    assert stats("shop.product")["uncached:random_order"] == "2"


def test_iterator_always_reads_the_database(world):
    for _ in range(2):
        with CaptureQueriesContext(connection) as queries:
            assert len(list(Product.objects.cache().iterator())) == 4
        assert len(queries.captured_queries) == 1
    assert stats("shop.product")["uncached:iterator"] == "2"


VOLATILE_READS = {
    "annotate_now": lambda: len(Product.objects.cache().annotate(at=Now())),
    "filter_now": lambda: len(Product.objects.cache().filter(updated_at__lte=Now())),
    "order_by_random": lambda: len(Product.objects.cache().order_by(Random())),
    "aggregate_filter_now": lambda: Product.objects.cache().aggregate(
        n=Count("pk", filter=Q(updated_at__lte=Now()))
    ),
    "prefetch_filter_now": lambda: len(
        Product.objects.cache().prefetch_related(
            Prefetch("orders", queryset=Order.objects.filter(created_at__lte=Now()))
        )
    ),
    "get_by_pk_filter_now": lambda: (
        Product.objects.cache()
        .filter(updated_at__lte=Now())
        .get(pk=Product.objects.order_by("pk")[0].pk)
    ),
    "filtered_relation_now": lambda: len(
        Product.objects.cache().annotate(
            past=FilteredRelation("orders", condition=Q(orders__created_at__lte=Now()))
        )
    ),
}


@pytest.mark.parametrize("read", VOLATILE_READS.values(), ids=VOLATILE_READS.keys())
def test_a_read_whose_sql_changes_its_value_with_time_always_reads_the_database(world, read):
    for _ in range(3):
        with CaptureQueriesContext(connection) as queries:
            read()
        assert len(queries.captured_queries) >= 1, "served from the cache: the time stands still"
    assert stats("shop.product")["uncached:volatile"] == "3"


RAW_PRODUCTS = 'SELECT * FROM "shop_product" ORDER BY "id"'


def test_a_raw_query_always_reads_the_database(world):
    for _ in range(2):
        with CaptureQueriesContext(connection) as queries:
            assert names(Product.objects.cache().raw(RAW_PRODUCTS))[0] == "apple"
            assert names(ormbridge.cached_queryset(Product.objects.raw(RAW_PRODUCTS)))[0] == "apple"
        assert len(queries.captured_queries) == 2
    assert stats("shop.product")["uncached:raw_query"] == "4"


def test_cached_queryset_of_something_else_than_a_queryset_says_what_it_takes():
    with pytest.raises(TypeError, match=r"cached_queryset\(\) takes a QuerySet, not .*Product"):
        ormbridge.cached_queryset(Product)


RAW_USES = RawSQL(
    'SELECT COUNT(*) FROM "shop_product_tags" WHERE "shop_product_tags"."tag_id" = "shop_tag"."id"',
    (),
)


def tags_with_raw_sql(queryset: models.QuerySet[Any]) -> list[Any]:
    inner = Tag.objects.annotate(uses=RAW_USES).order_by("pk")
    rows = queryset.prefetch_related(Prefetch("tags", queryset=inner)).order_by("pk")
    return [(p.name, [(t.name, t.uses) for t in p.tags.all()]) for p in rows]


def test_a_prefetch_holding_raw_sql_is_refused_and_says_what_to_pass(world):
    for _ in range(2):
        with CaptureQueriesContext(connection) as queries:
            tags_with_raw_sql(Product.objects.cache())
        assert len(queries.captured_queries) == 2
    assert stats("shop.product")["uncached:raw_sql"] == "2"
    inner = Tag.objects.annotate(uses=RAW_USES)
    with pytest.raises(Uncacheable, match=r"Prefetch\('tags'\): .*RawSQL.*depends_on=") as refused:
        compile_queryset(Product.objects.prefetch_related(Prefetch("tags", queryset=inner)))
    assert refused.value.reason == "raw_sql"


def test_a_prefetch_holding_raw_sql_with_declared_dependencies_is_cached_and_fresh(world):
    def read() -> list[Any]:
        return tags_with_raw_sql(Product.objects.cache(depends_on=[Tag]))

    assert read_twice(read) == tags_with_raw_sql(Product.objects.all())
    with CaptureQueriesContext(connection) as queries:
        read()
    assert queries.captured_queries == []
    CHANGES["tag_added"](world)  # read by the raw SQL alone: the red tag is used once more
    assert read() == tags_with_raw_sql(Product.objects.all())


def test_raw_sql_in_a_filtered_relations_condition_is_refused_as_anywhere_else(world):
    condition = Q(orders__quantity__gte=RawSQL("SELECT 2", ()))
    query = big_orders(cached).annotate(big2=FilteredRelation("orders", condition=condition))
    for _ in range(2):
        with CaptureQueriesContext(connection) as queries:
            assert len(query.filter(big2__isnull=False)) == 2
        assert len(queries.captured_queries) == 1
    assert stats("shop.product")["uncached:raw_sql"] == "2"


# -- errors: Django's own


@pytest.mark.parametrize("lookup", ["name", "nothing", "tags__name"])
def test_an_invalid_prefetch_raises_djangos_own_error(world, lookup):
    with pytest.raises(Exception) as django_error:
        list(Product.objects.prefetch_related(lookup))
    with pytest.raises(type(django_error.value)) as cached_error:
        list(Product.objects.cache().prefetch_related(lookup))
    assert str(cached_error.value) == str(django_error.value)


def test_a_prefetch_of_a_values_queryset_raises_djangos_own_error(world):
    with pytest.raises(ValueError, match=r"Prefetch querysets cannot use raw\(\), values\(\)"):
        Product.objects.cache().prefetch_related(Prefetch("tags", Tag.objects.values("name")))
