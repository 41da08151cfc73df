"""cached_view_as: views cached per URL (and per client where they depend on it) until a
row they depend on changes, through Django's test client and the example's middleware."""

import secrets
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.contrib.sessions.backends.db import SessionStore
from django.contrib.sessions.models import Session
from django.db import connection
from django.http import HttpResponse
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import ormbridge
from ormbridge import redis_store, relay
from shop.models import Product
from tests.factories import make_products, wait_delivered

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.urls("tests.testapp.urls"),
    pytest.mark.databases,
    pytest.mark.redis,
]


def view_ran(request, *args, **kwargs) -> bool:
    """Whether ``request(*args, **kwargs)`` ran the view (which reads the products)."""
    with CaptureQueriesContext(connection) as queries:
        request(*args, **kwargs)
    return any('"shop_product"' in query["sql"] for query in queries.captured_queries)


def entries() -> list[str]:
    return redis_store.get_redis().keys(redis_store.key("entry", "*"))


def session_cookie(client: Client) -> str:
    return client.cookies[django_settings.SESSION_COOKIE_NAME].value


def presenting(cookie: str) -> Client:
    """A new client that presents ``cookie`` as its session cookie (kept, stolen or made up)."""
    client = Client()
    client.cookies[django_settings.SESSION_COOKIE_NAME] = cookie
    return client


def anonymous_session(visits: int) -> Client:
    """A client without a user whose session holds ``visits``."""
    client = Client()
    session = client.session  # saved, and its key set as the client's cookie
    session["visits"] = visits
    session.save()
    return client


def private(client: Client) -> str:
    return client.get("/private/").content.decode()


def ann_page(product: Product) -> str:
    return f"private page of ann <ann@example.com>: {product.name}"


def nobodys_page(product: Product) -> str:
    return f"private page of nobody: {product.name}"


@pytest.fixture
def ann(django_user_model) -> Client:
    client = Client()
    client.force_login(django_user_model.objects.create_user("ann", "ann@example.com"))
    return client


@pytest.fixture
def bob(django_user_model) -> Client:
    client = Client()
    client.force_login(django_user_model.objects.create_user("bob", "bob@example.com"))
    return client


def test_the_second_get_is_served_from_the_cache(no_relay, client, django_assert_num_queries):
    products = make_products(2)
    first = client.get("/products/")
    with django_assert_num_queries(0):
        second = client.get("/products/")
    assert second.status_code == 200
    assert (
        second.content
        == first.content
        == f"{products[0].name}, {products[1].name} (page 1)".encode()
    )


def test_the_page_is_fresh_after_a_committed_change_to_its_model(no_relay, client):
    [product] = make_products(1)
    relay.drain()  # the setup's rows: only the change under test may invalidate
    assert client.get("/products/").content == f"{product.name} (page 1)".encode()
    product.name = "renamed"
    product.save()
    relay.drain()
    assert client.get("/products/").content == b"renamed (page 1)"


def test_with_a_worker_the_page_is_fresh_after_a_committed_change(worker, client):
    [product] = make_products(1)
    wait_delivered()
    client.get("/products/")
    Product.objects.filter(pk=product.pk).update(name="renamed")
    wait_delivered()
    assert client.get("/products/").content == b"renamed (page 1)"


def test_each_query_string_has_its_own_entry(no_relay, client):
    make_products(1)
    assert client.get("/products/", {"page": 2}).content.endswith(b"(page 2)")
    assert client.get("/products/", {"page": 3}).content.endswith(b"(page 3)")
    assert not view_ran(client.get, "/products/", {"page": 2})


def test_a_head_request_is_cached_apart_from_get(no_relay, client):
    make_products(1)
    client.get("/products/")
    assert view_ran(client.head, "/products/")
    assert not view_ran(client.head, "/products/")


def test_a_post_runs_the_view_every_time(no_relay, client):
    make_products(1)
    client.get("/products/")
    assert view_ran(client.post, "/products/")
    assert view_ran(client.post, "/products/")


def test_a_page_that_does_not_read_the_user_is_shared_by_all_users(no_relay, ann, bob):
    make_products(1)
    ann.get("/products/")
    assert not view_ran(bob.get, "/products/")


def test_two_logged_in_users_never_see_each_others_page(
    no_relay, ann, bob, client, django_assert_num_queries
):
    [product] = make_products(1)
    assert ann.get("/greeting/").content == f"ann sees {product.name}".encode()
    assert bob.get("/greeting/").content == f"bob sees {product.name}".encode()
    assert client.get("/greeting/").content == f"anonymous sees {product.name}".encode()
    # A hit: the session's and the user's queries (the identity Django validates), no more.
    with django_assert_num_queries(2):
        assert ann.get("/greeting/").content == f"ann sees {product.name}".encode()
    with django_assert_num_queries(2):
        assert bob.get("/greeting/").content == f"bob sees {product.name}".encode()
    with django_assert_num_queries(0):  # no session cookie: nothing to load
        assert client.get("/greeting/").content == f"anonymous sees {product.name}".encode()


def test_a_page_that_reads_the_user_says_vary_cookie_also_when_served_from_the_cache(no_relay, ann):
    make_products(1)
    assert "Cookie" in ann.get("/greeting/")["Vary"]
    assert not view_ran(ann.get, "/greeting/")
    assert "Cookie" in ann.get("/greeting/")["Vary"]


def test_users_that_do_not_come_from_the_session_never_see_each_others_page(
    no_relay, settings, django_user_model
):
    settings.MIDDLEWARE = [*settings.MIDDLEWARE, "tests.testapp.middleware.HeaderUserMiddleware"]
    django_user_model.objects.create_user("ann")
    django_user_model.objects.create_user("bob")
    [product] = make_products(1)
    client = Client()
    assert (
        client.get("/greeting/", headers={"X-User": "ann"}).content
        == f"ann sees {product.name}".encode()
    )
    assert (
        client.get("/greeting/", headers={"X-User": "bob"}).content
        == f"bob sees {product.name}".encode()
    )
    assert not view_ran(client.get, "/greeting/", headers={"X-User": "ann"})


def test_a_template_that_shows_the_user_makes_the_page_per_user(no_relay, client, ann, bob):
    make_products(1)
    assert client.get("/greeting-page/").content.strip() == b"anonymous sees 1 products"
    assert ann.get("/greeting-page/").content.strip() == b"ann sees 1 products"
    assert bob.get("/greeting-page/").content.strip() == b"bob sees 1 products"
    assert not view_ran(ann.get, "/greeting-page/")


def test_clients_without_a_session_share_the_anonymous_page(no_relay, client):
    [product] = make_products(1)
    client.get("/greeting/")
    assert Client().get("/greeting/").content == f"anonymous sees {product.name}".encode()
    assert not view_ran(Client().get, "/greeting/")


def test_after_logout_the_old_session_cookie_gets_the_anonymous_page(no_relay, ann):
    [product] = make_products(1)
    cookie = session_cookie(ann)
    assert private(ann) == ann_page(product)
    ann.logout()  # deletes the session
    assert private(presenting(cookie)) == nobodys_page(product)


def test_after_set_password_the_old_session_gets_the_anonymous_page(
    no_relay, ann, django_user_model
):
    [product] = make_products(1)
    assert private(ann) == ann_page(product)
    user = django_user_model.objects.get(username="ann")
    user.set_password("changed")
    user.save()  # the session's auth hash no longer matches: Django flushes the session
    assert private(ann) == nobodys_page(product)


@pytest.mark.parametrize(
    "delete",
    [lambda key: Session.objects.all().delete(), lambda key: SessionStore(key).delete()],
    ids=["all-sessions", "session-store"],
)
def test_a_session_deleted_on_the_server_gets_the_anonymous_page(no_relay, ann, delete):
    [product] = make_products(1)
    assert private(ann) == ann_page(product)
    delete(session_cookie(ann))
    assert private(ann) == nobodys_page(product)


def test_an_expired_session_gets_the_anonymous_page(no_relay, ann):
    [product] = make_products(1)
    assert private(ann) == ann_page(product)
    Session.objects.update(expire_date=timezone.now() - timedelta(seconds=1))
    assert private(ann) == nobodys_page(product)


def test_a_session_cookie_that_was_never_issued_shares_the_anonymous_page(no_relay, client):
    [product] = make_products(1)
    assert private(client) == nobodys_page(product)  # stored for clients without a session
    assert not view_ran(presenting(secrets.token_hex(16)).get, "/private/")
    assert private(presenting(secrets.token_hex(16))) == nobodys_page(product)


def test_update_session_auth_hash_keeps_the_changing_client_on_its_private_page(no_relay, ann):
    [product] = make_products(1)
    assert private(ann) == ann_page(product)
    assert ann.post("/password/", {"password": "changed"}).content == b"changed"
    assert private(ann) == ann_page(product)


def test_a_password_changed_on_another_client_ends_this_clients_private_page(
    no_relay, ann, django_user_model
):
    [product] = make_products(1)
    other = Client()
    other.force_login(django_user_model.objects.get(username="ann"))
    assert private(ann) == ann_page(product)
    assert other.post("/password/", {"password": "changed"}).content == b"changed"
    assert private(ann) == nobodys_page(product)
    assert private(other) == ann_page(product)


def test_a_deactivated_user_gets_the_anonymous_page(no_relay, ann, django_user_model):
    [product] = make_products(1)
    assert private(ann) == ann_page(product)
    django_user_model.objects.filter(username="ann").update(is_active=False)
    assert private(ann) == nobodys_page(product)


def test_a_session_that_no_longer_exists_does_not_get_its_old_page(no_relay):
    [product] = make_products(1)
    client = anonymous_session(visits=3)
    assert client.get("/visits-seen/").content == f"{product.name}: 3 visits seen".encode()
    Session.objects.all().delete()
    assert client.get("/visits-seen/").content == f"{product.name}: 0 visits seen".encode()


def test_each_anonymous_session_gets_the_page_of_its_own_data(no_relay):
    [product] = make_products(1)
    first, second = anonymous_session(visits=1), anonymous_session(visits=2)
    assert first.get("/visits-seen/").content == f"{product.name}: 1 visits seen".encode()
    assert second.get("/visits-seen/").content == f"{product.name}: 2 visits seen".encode()
    assert not view_ran(first.get, "/visits-seen/")


def test_the_page_of_a_session_flushed_for_a_changed_password_is_not_left_to_others(
    no_relay, ann, django_user_model
):
    [product] = make_products(1)
    session = ann.session
    session["visits"] = 3
    session.save()
    user = django_user_model.objects.get(username="ann")
    user.set_password("changed")
    user.save()
    ann.get("/visits-seen/")  # the view reads the session only; Django flushes it for the user
    assert Client().get("/visits-seen/").content == f"{product.name}: 0 visits seen".encode()


def test_a_page_with_a_csrf_token_is_cached_per_csrf_cookie_and_not_before_it_is_set(no_relay):
    make_products(1)
    first, second = Client(), Client()
    assert view_ran(first.get, "/form/")  # issues the client its CSRF cookie: not stored
    assert view_ran(first.get, "/form/")  # with the cookie: stored for it
    assert not view_ran(first.get, "/form/")
    assert view_ran(second.get, "/form/")


def test_only_a_200_response_is_cached(no_relay, client):
    make_products(1)
    assert client.get("/status/404/").status_code == 404
    assert view_ran(client.get, "/status/404/")
    client.get("/status/200/")
    assert not view_ran(client.get, "/status/200/")


def test_a_response_that_sets_a_cookie_is_not_cached(no_relay, client):
    make_products(1)
    assert client.get("/cookie/").cookies["seen"].value == "yes"
    assert view_ran(client.get, "/cookie/")


@pytest.mark.parametrize(
    ("via", "header"),
    [("headers", "Set-Cookie"), ("headers", "set-cookie"), ("item", "SET-COOKIE")],
)
def test_a_response_with_a_set_cookie_header_set_by_hand_is_not_cached(no_relay, via, header):
    make_products(1)
    url = f"/set-cookie-header/{header}/?via={via}"
    first, second = Client().get(url), Client().get(url)
    assert first["Set-Cookie"].startswith("token=")
    assert first["Set-Cookie"] != second["Set-Cookie"]


def test_a_streaming_response_is_not_cached(no_relay, client):
    [product] = make_products(1)
    assert b"".join(client.get("/streaming/").streaming_content) == product.name.encode()
    assert view_ran(client.get, "/streaming/")


def test_a_page_that_adds_a_message_is_not_cached(no_relay, client):
    make_products(1)
    client.get("/message/")
    assert view_ran(client.get, "/message/")


def test_a_page_that_writes_the_session_is_not_cached(no_relay, ann):
    [product] = make_products(1)
    assert ann.get("/visits/").content == f"{product.name}: visit 1".encode()
    assert ann.get("/visits/").content == f"{product.name}: visit 2".encode()


def test_an_unregistered_model_raises_lookup_error_naming_it_before_the_view_runs(client):
    refused = pytest.raises(LookupError, match=r"ormbridge\.ChangeBatch is not registered")
    with CaptureQueriesContext(connection) as queries, refused:
        client.get("/change-log/")
    assert not any("ormbridge_changebatch" in q["sql"] for q in queries.captured_queries)
    assert entries() == []


@pytest.mark.parametrize("source", ["shop.Product", Product(), Product.objects])
def test_a_source_that_is_neither_a_model_nor_a_queryset_raises_type_error(source):
    with pytest.raises(TypeError, match="models and querysets"):
        ormbridge.cached_view_as(source)


def test_an_async_view_is_refused():
    async def view(request) -> HttpResponse:
        return HttpResponse()

    with pytest.raises(TypeError, match="async"):
        ormbridge.cached_view_as(Product)(view)
