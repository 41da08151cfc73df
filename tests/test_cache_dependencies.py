"""A cached entry depends on every table its read touches (issue 16, items 4 to 8).

The manager and queryset that produced an entry, raw SQL fragments, every operand of a
combined query, the follow-up queries a load runs (django-polymorphic's children), and
reads that plain Django answers but the cache once refused or broke on. No relay runs:
each test delivers the change log itself (``relay.drain()``), its setup's rows before the
first cached read, so only the change under test can invalidate.
"""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.models import F, Sum
from django.db.models.expressions import RawSQL
from django.test.utils import CaptureQueriesContext

import ormbridge
from ormbridge import redis_store, relay
from ormbridge.cache import cached_instance
from shop.models import Category, Note, Order, Product
from tests.factories import make_products
from tests.testapp.models import ArtProject, Blog, Book, Entry, Number, Post, Project, Shelf

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]


def stats(label: str) -> dict[str, str]:
    from ormbridge import stats as counters

    counters.counts.send()
    return redis_store.get_redis().hgetall(redis_store.stats_key(label))


def read_twice(read):
    """``read()`` twice: the first may only learn which tables its load reads."""
    read()
    return read()


# -- item 4: the manager's shape


def test_an_instance_read_through_a_joining_manager_is_fresh_after_the_joined_row_changes(
    no_relay,
):
    shelf = Shelf.objects.create(name="old name")
    book = Book.objects.create(shelf=shelf, title="a book")
    relay.drain()
    assert read_twice(lambda: cached_instance(Book, book.pk).shelf.name) == "old name"
    shelf.name = "new name"
    shelf.save()
    assert cached_instance(Book, book.pk).shelf.name == "new name"
    relay.drain()
    assert cached_instance(Book, book.pk).shelf.name == "new name"


def test_an_instance_read_through_a_joining_manager_is_served_from_the_cache(
    no_relay, django_assert_num_queries
):
    book = Book.objects.create(shelf=Shelf.objects.create(name="a shelf"), title="a book")
    relay.drain()
    read_twice(lambda: cached_instance(Book, book.pk))
    with django_assert_num_queries(0):
        assert cached_instance(Book, book.pk).shelf.name == "a shelf"


def test_an_unfiltered_manager_does_not_fill_the_default_managers_entry(no_relay):
    draft = Post.objects.create(title="a draft", published=False)
    relay.drain()
    assert Post.all_objects.cache().get(pk=draft.pk).title == "a draft"
    with pytest.raises(Post.DoesNotExist):
        cached_instance(Post, draft.pk)


def test_the_default_managers_entry_does_not_answer_an_unfiltered_manager(no_relay):
    draft = Post.objects.create(title="a draft", published=False)
    relay.drain()
    with pytest.raises(Post.DoesNotExist):
        Post.objects.cache().get(pk=draft.pk)
    assert Post.all_objects.cache().get(pk=draft.pk).title == "a draft"


def test_a_get_through_the_default_manager_shares_cached_instances_entry(
    no_relay, django_assert_num_queries
):
    post = Post.objects.create(title="published", published=True)
    relay.drain()
    read_twice(lambda: cached_instance(Post, post.pk))
    with django_assert_num_queries(0):
        assert Post.objects.cache().get(pk=post.pk).title == "published"


def test_an_unpublished_post_leaves_the_default_managers_entry(no_relay):
    post = Post.objects.create(title="published", published=True)
    relay.drain()
    read_twice(lambda: cached_instance(Post, post.pk))
    Post.all_objects.filter(pk=post.pk).update(published=False)
    with pytest.raises(Post.DoesNotExist):
        cached_instance(Post, post.pk)


# -- item 5: raw SQL fragments

CATEGORY_NAME = (
    'SELECT "name" FROM "shop_category" WHERE "shop_category"."id" = "shop_product"."category_id"'
)


def with_category_name():
    return Product.objects.annotate(category_name=RawSQL(CATEGORY_NAME, ()))


def test_a_raw_sql_annotation_is_read_through_and_counted_without_declared_dependencies(
    no_relay,
):
    make_products(1, category=Category.objects.create(name="books"))
    relay.drain()
    for _ in range(2):
        with CaptureQueriesContext(connection) as queries:
            [row] = Product.objects.cache().annotate(category_name=RawSQL(CATEGORY_NAME, ()))
        assert row.category_name == "books"
        assert len(queries.captured_queries) == 1
    assert stats("shop.product")["uncached:raw_sql"] == "2"


def test_a_raw_sql_annotation_with_declared_dependencies_is_fresh(no_relay):
    category = Category.objects.create(name="books")
    make_products(1, category=category)
    relay.drain()
    query = with_category_name()

    def read():
        rows = ormbridge.cached_queryset(query, depends_on=[Category])
        return [p.category_name for p in rows]

    assert read_twice(read) == ["books"]
    category.name = "novels"
    category.save()
    assert read() == ["novels"]


def test_an_extra_where_is_read_through(no_relay, django_assert_num_queries):
    make_products(1)
    relay.drain()
    query = Product.objects.cache().extra(where=["1 = 1"])
    for _ in range(2):
        with django_assert_num_queries(1):
            assert len(query.all()) == 1


# -- item 6: combined queries


@pytest.mark.parametrize("combine", ["union", "intersection", "difference"])
def test_a_combined_query_is_fresh_after_a_row_of_its_second_operand_changes(no_relay, combine):
    make_products(1)  # "product 0..." names: none of them is a category's
    first = Category.objects.create(name="test1")
    second = Category.objects.create(name="test2")
    relay.drain()
    names = Category.objects.values_list("name", flat=True)
    others = Product.objects.values_list("name", flat=True)
    query = getattr(names, combine)(others).order_by("name")
    before = list(query)
    assert read_twice(lambda: list(ormbridge.cached_queryset(query))) == before
    Product.objects.filter(pk=Product.objects.get().pk).update(name="test1")
    after = list(query.all())
    assert after != before
    assert list(ormbridge.cached_queryset(query)) == after
    assert first and second


# -- item 7: children loaded by follow-up queries


def test_a_polymorphic_child_is_fresh_after_a_write_to_its_child_table_only(no_relay):
    project = ArtProject.objects.create(topic="painting", artist="Alice")
    relay.drain()
    assert read_twice(lambda: cached_instance(Project, project.pk).artist) == "Alice"
    queryset = Project.objects.filter(pk=project.pk)
    assert read_twice(lambda: ormbridge.cached_queryset(queryset)[0].artist) == "Alice"
    ArtProject.objects.filter(pk=project.pk).update(artist="Bob")
    relay.drain()
    assert cached_instance(Project, project.pk).artist == "Bob"
    assert ormbridge.cached_queryset(queryset)[0].artist == "Bob"


def test_a_polymorphic_child_is_served_from_the_cache(no_relay, django_assert_num_queries):
    project = ArtProject.objects.create(topic="painting", artist="Alice")
    relay.drain()
    read_twice(lambda: cached_instance(Project, project.pk))
    with django_assert_num_queries(0):
        assert type(cached_instance(Project, project.pk)) is ArtProject


def test_a_non_polymorphic_queryset_has_an_entry_of_its_own(no_relay):
    project = ArtProject.objects.create(topic="painting", artist="Alice")
    relay.drain()
    polymorphic = Project.objects.filter(pk=project.pk)
    assert type(read_twice(lambda: ormbridge.cached_queryset(polymorphic)[0])) is ArtProject
    plain = Project.objects.non_polymorphic().filter(pk=project.pk)
    assert type(ormbridge.cached_queryset(plain)[0]) is Project


# -- item 8: reads plain Django answers


def test_an_aggregate_over_an_aggregate_annotation_is_cached_and_fresh(no_relay):
    Number.objects.bulk_create([Number(group="a", num=1), Number(group="a", num=2)])
    relay.drain()

    def total():
        return Number.objects.cache().annotate(total=Sum("num")).aggregate(Sum("total"))

    assert total() == Number.objects.annotate(total=Sum("num")).aggregate(Sum("total"))
    assert read_twice(total) == {"total__sum": 3}
    Number.objects.create(group="b", num=4)
    assert total() == {"total__sum": 7}


def test_an_aggregate_over_a_join_is_fresh_after_the_joined_row_changes(no_relay):
    [product] = make_products(1)
    Order.objects.create(product=product, quantity=2)
    relay.drain()

    def total():
        return Product.objects.cache().aggregate(total=Sum("orders__quantity"))["total"]

    assert read_twice(total) == 2
    Order.objects.update(quantity=F("quantity") + 1)
    assert total() == 3


def test_a_reverse_foreign_key_without_related_name_is_prefetched_and_fresh(no_relay):
    blog = Blog.objects.create(name="a blog")
    Entry.objects.create(blog=blog, headline="first")
    relay.drain()
    query = Blog.objects.prefetch_related("entry_set")

    def headlines():
        return [[e.headline for e in b.entry_set.all()] for b in ormbridge.cached_queryset(query)]

    assert read_twice(headlines) == [["first"]]
    Entry.objects.create(blog=blog, headline="second")
    assert sorted(headlines()[0]) == ["first", "second"]


# -- what ormbridge does not watch


def test_a_load_that_reads_an_unregistered_model_is_read_through_and_counted(no_relay):
    from tests.testapp.models import Unwatched

    Note.objects.create(subject=Unwatched.objects.create(name="elsewhere"), text="a note")
    relay.drain()
    query = Note.objects.prefetch_related("subject")  # whose rows: known once loaded
    for _ in range(2):
        with CaptureQueriesContext(connection) as queries:
            [note] = ormbridge.cached_queryset(query)
        assert note.subject.name == "elsewhere"
        assert len(queries.captured_queries) >= 2
    assert stats("shop.note")["uncached:unregistered"] == "2"


def test_a_queryset_reading_an_unregistered_model_is_refused(no_relay):
    from tests.testapp.models import Unwatched

    with pytest.raises(LookupError, match=r"testapp\.unwatched"):
        ormbridge.cached_queryset(Unwatched.objects.all())
