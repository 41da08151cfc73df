"""@ormbridge.cached_as: a function's result cached until a row it depends on changes."""

import pytest

import ormbridge
from ormbridge import redis_store, relay
from ormbridge.models import ChangeBatch
from shop.models import Category, Customer, Product
from tests.factories import make_products, wait_delivered

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]


def entry_ttls() -> list[int]:
    client = redis_store.get_redis()
    return [client.ttl(key) for key in client.keys(redis_store.key("entry", "*"))]


def test_the_second_call_is_served_from_the_cache(no_relay, django_assert_num_queries):
    make_products(2)
    calls = []

    @ormbridge.cached_as(Product)
    def product_count() -> int:
        calls.append(1)
        return Product.objects.count()

    assert product_count() == 2
    with django_assert_num_queries(0):
        assert product_count() == 2
    assert len(calls) == 1


def test_the_result_is_fresh_after_a_committed_change_to_its_model(no_relay):
    [product] = make_products(1)
    relay.drain()  # the setup's rows: only the change under test may invalidate

    @ormbridge.cached_as(Product)
    def names() -> list[str]:
        return list(Product.objects.values_list("name", flat=True))

    assert names() == [product.name]
    product.name = "renamed"
    product.save()
    relay.drain()
    assert names() == ["renamed"]


def test_a_queryset_source_depends_on_the_models_it_joins(no_relay):
    books = Category.objects.create(name="books")
    make_products(2, category=books)
    relay.drain()
    in_books = Product.objects.filter(category__name="books")

    @ormbridge.cached_as(in_books)
    def count_in_books() -> int:
        return in_books.count()

    assert count_in_books() == 2
    books.name = "novels"
    books.save()
    relay.drain()
    assert count_in_books() == 0


def test_with_a_worker_the_result_is_fresh_after_a_committed_change(worker):
    [product] = make_products(1)
    wait_delivered()

    @ormbridge.cached_as(Product)
    def prices() -> list[str]:
        return [str(price) for price in Product.objects.values_list("price", flat=True)]

    assert prices() == ["1.00"]
    Product.objects.filter(pk=product.pk).update(price=3)
    wait_delivered()
    assert prices() == ["3.00"]


def test_each_set_of_arguments_has_its_own_entry(no_relay):
    make_products(3)
    calls = []

    @ormbridge.cached_as(Product)
    def cheaper_than(limit: int, *, stock: int = 0) -> int:
        calls.append((limit, stock))
        return Product.objects.filter(price__lt=limit, stock__gte=stock).count()

    assert [cheaper_than(5), cheaper_than(0), cheaper_than(5, stock=1), cheaper_than(5)] == [
        3,
        0,
        0,
        3,
    ]
    assert calls == [(5, 0), (0, 0), (5, 1)]


def test_a_model_instance_argument_is_keyed_by_its_pk(no_relay):
    first, second = Category.objects.create(name="a"), Category.objects.create(name="b")
    make_products(1, category=second)

    @ormbridge.cached_as(Product)
    def count_in(category: Category) -> int:
        return category.products.count()

    assert count_in(first) == 0
    assert count_in(second) == 1
    assert count_in(Category.objects.get(name="b")) == 1


def test_an_argument_whose_repr_does_not_identify_it_is_refused(no_relay):
    @ormbridge.cached_as(Product)
    def count(anything: object) -> int:
        return Product.objects.count()

    with pytest.raises(TypeError, match="key="):
        count(object())
    with pytest.raises(TypeError, match="key="):
        count(Product.objects.all())
    assert entry_ttls() == []


def test_a_key_callable_stands_for_the_arguments(no_relay):
    make_products(1)
    calls = []

    @ormbridge.cached_as(Product, key=lambda queryset: str(queryset.query))
    def count(queryset) -> int:
        calls.append(1)
        return queryset.count()

    assert count(Product.objects.all()) == 1
    assert count(Product.objects.all()) == 1
    assert count(Product.objects.filter(stock__gt=0)) == 0
    assert len(calls) == 2


def test_a_key_string_names_the_function_instead_of_its_qualified_name(no_relay):
    make_products(2)

    def counter(minimum: int):
        @ormbridge.cached_as(Product, key=f"products-over-{minimum}")
        def count() -> int:
            return Product.objects.filter(stock__gte=minimum).count()

        return count

    assert counter(0)() == 2
    assert counter(1)() == 0  # the same qualified name, another entry


def test_without_a_timeout_the_entry_lives_the_models_cache_timeout(no_relay):
    @ormbridge.cached_as(Customer)  # ORMBRIDGE["MODELS"] gives shop.Customer 600 s
    def customers() -> int:
        return Customer.objects.count()

    customers()
    [ttl] = entry_ttls()
    assert 590 < ttl <= 600


def test_a_timeout_sets_how_long_the_entry_lives(no_relay):
    @ormbridge.cached_as(Customer, timeout=30)
    def customers() -> int:
        return Customer.objects.count()

    customers()
    [ttl] = entry_ttls()
    assert 0 < ttl <= 30


def test_an_unregistered_model_raises_lookup_error_naming_it_before_the_function_runs():
    calls = []

    @ormbridge.cached_as(ChangeBatch)
    def log_size() -> int:
        calls.append(1)
        return ChangeBatch.objects.count()

    with pytest.raises(LookupError, match=r"ormbridge\.ChangeBatch is not registered"):
        log_size()
    assert calls == []
    assert entry_ttls() == []


def test_a_queryset_reading_an_unregistered_model_raises_lookup_error_naming_it():
    @ormbridge.cached_as(Product.objects.filter(pk__in=ChangeBatch.objects.values("id")))
    def count() -> int:
        return 0

    with pytest.raises(LookupError, match=r"ormbridge\.changebatch"):
        count()


@pytest.mark.parametrize("source", ["shop.Product", Product(), None, Customer.objects])
def test_a_source_that_is_neither_a_model_nor_a_queryset_raises_type_error(source):
    with pytest.raises(TypeError, match="models and querysets"):
        ormbridge.cached_as(source)


def test_sources_are_required():
    with pytest.raises(TypeError, match="needs the models or querysets"):
        ormbridge.cached_as()
