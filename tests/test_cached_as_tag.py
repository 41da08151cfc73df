"""{% cached_as %}: a template fragment cached until a row it depends on changes."""

import pytest
from django.template import Context, Template, TemplateSyntaxError

from ormbridge import redis_store, relay
from ormbridge.models import ChangeBatch
from shop.models import Category, Customer, Product
from tests.factories import make_products, wait_delivered

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]

NAMES = "{% for product in products %}{{ product.name }};{% endfor %}"


def render(source: str, **context) -> str:
    return Template("{% load ormbridge %}" + source).render(Context(context))


def entry_ttls() -> list[int]:
    client = redis_store.get_redis()
    return [client.ttl(key) for key in client.keys(redis_store.key("entry", "*"))]


def test_the_second_render_is_served_from_the_cache(no_relay, django_assert_num_queries):
    products = make_products(2)
    fragment = '{% cached_as products 600 "names" %}' + NAMES + "{% endcached_as %}"
    expected = f"{products[0].name};{products[1].name};"
    assert render(fragment, products=Product.objects.order_by("pk")) == expected
    with django_assert_num_queries(0):
        assert render(fragment, products=Product.objects.order_by("pk")) == expected


def test_the_fragment_is_fresh_after_a_committed_change_to_its_model(no_relay):
    [product] = make_products(1)
    relay.drain()  # the setup's rows: only the change under test may invalidate
    fragment = '{% cached_as products None "names" %}' + NAMES + "{% endcached_as %}"
    render(fragment, products=Product.objects.all())
    product.name = "renamed"
    product.save()
    relay.drain()
    assert render(fragment, products=Product.objects.all()) == "renamed;"


def test_with_a_worker_the_fragment_is_fresh_after_a_committed_change(worker):
    [product] = make_products(1)
    wait_delivered()
    fragment = '{% cached_as products None "names" %}' + NAMES + "{% endcached_as %}"
    render(fragment, products=Product.objects.all())
    Product.objects.filter(pk=product.pk).update(name="renamed")
    wait_delivered()
    assert render(fragment, products=Product.objects.all()) == "renamed;"


def test_the_fragment_depends_on_the_models_its_queryset_joins(no_relay):
    books = Category.objects.create(name="books")
    make_products(1, category=books)
    relay.drain()
    fragment = '{% cached_as products None "in-books" %}{{ products.count }}{% endcached_as %}'
    assert render(fragment, products=Product.objects.filter(category__name="books")) == "1"
    books.name = "novels"
    books.save()
    relay.drain()
    assert render(fragment, products=Product.objects.filter(category__name="books")) == "0"


def test_a_list_of_sources_depends_on_each(no_relay):
    fragment = (
        '{% cached_as sources None "counts" %}'
        "{{ products.count }}/{{ customers.count }}{% endcached_as %}"
    )
    context = {
        "products": Product.objects.all(),
        "customers": Customer.objects.all(),
        "sources": [Product.objects.all(), Customer],
    }
    assert render(fragment, **context) == "0/0"
    Customer.objects.create(email="ann@example.com")
    relay.drain()
    assert render(fragment, **context) == "0/1"


def test_a_model_in_the_context_stands_for_all_its_rows(no_relay):
    """The template engine calls the class: the tag takes the instance for its model."""
    fragment = '{% cached_as model None "count" %}{{ count }}{% endcached_as %}'
    assert render(fragment, model=Customer, count=0) == "0"
    Customer.objects.create(email="ann@example.com")
    relay.drain()
    assert render(fragment, model=Customer, count=1) == "1"


def test_each_set_of_vary_on_values_has_its_own_entry(no_relay):
    make_products(1)
    fragment = '{% cached_as products None "page" page %}{{ page }}{% endcached_as %}'
    assert render(fragment, products=Product.objects.all(), page=1) == "1"
    assert render(fragment, products=Product.objects.all(), page=2) == "2"
    assert render(fragment, products=Product.objects.all(), page=1) == "1"


def test_the_name_is_the_same_quoted_or_not(no_relay):
    render("{% cached_as products None names %}first{% endcached_as %}", products=Product)
    assert (
        render('{% cached_as products None "names" %}second{% endcached_as %}', products=Product)
        == "first"
    )


def test_a_timeout_sets_how_long_the_entry_lives(no_relay):
    render('{% cached_as products 30 "names" %}x{% endcached_as %}', products=Product)
    [ttl] = entry_ttls()
    assert 0 < ttl <= 30


def test_without_a_timeout_the_entry_lives_the_models_cache_timeout(no_relay):
    # ORMBRIDGE["MODELS"] gives shop.Customer 600 s.
    render('{% cached_as customers None "emails" %}x{% endcached_as %}', customers=Customer)
    [ttl] = entry_ttls()
    assert 590 < ttl <= 600


def test_an_unregistered_model_raises_lookup_error_naming_it_before_anything_is_cached():
    with pytest.raises(LookupError, match=r"ormbridge\.ChangeBatch is not registered"):
        render('{% cached_as log None "log" %}x{% endcached_as %}', log=ChangeBatch)
    with pytest.raises(LookupError, match=r"ormbridge\.changebatch"):
        render(
            '{% cached_as products None "log" %}x{% endcached_as %}',
            products=Product.objects.filter(pk__in=ChangeBatch.objects.values("id")),
        )
    assert entry_ttls() == []


def test_a_source_that_is_neither_a_model_nor_a_queryset_raises_type_error():
    with pytest.raises(TypeError, match="models and querysets"):
        render('{% cached_as products None "names" %}x{% endcached_as %}', products="Product")
    assert entry_ttls() == []


def test_an_unknown_sources_variable_is_a_template_syntax_error():
    with pytest.raises(TemplateSyntaxError, match="unknown variable: 'missing'"):
        render('{% cached_as missing None "names" %}x{% endcached_as %}')


def test_a_timeout_that_is_not_an_integer_is_a_template_syntax_error():
    with pytest.raises(TemplateSyntaxError, match="non-integer timeout"):
        render('{% cached_as products "soon" "names" %}x{% endcached_as %}', products=Product)


def test_fewer_than_three_arguments_is_a_template_syntax_error():
    with pytest.raises(TemplateSyntaxError, match="at least 3 arguments"):
        render("{% cached_as products 60 %}x{% endcached_as %}")
