"""Views cached with ``cached_view_as`` for tests/test_cached_view_as.py."""

import uuid

from django.contrib import messages
from django.contrib.auth import update_session_auth_hash
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.middleware.csrf import get_token
from django.template.response import TemplateResponse

from ormbridge import cached_view_as
from ormbridge.models import ChangeBatch
from shop.models import Product


def names() -> str:
    return ", ".join(Product.objects.order_by("pk").values_list("name", flat=True))


@cached_view_as(Product)
def product_names(request: HttpRequest) -> HttpResponse:
    """Depends on the products and on the query string only."""
    return HttpResponse(f"{names()} (page {request.GET.get('page', 1)})")


@cached_view_as(Product)
def greeting(request: HttpRequest) -> HttpResponse:
    """Depends on the user: reading request.user loads the session."""
    return HttpResponse(f"{request.user.get_username() or 'anonymous'} sees {names()}")


@cached_view_as(Product)
def private_page(request: HttpRequest) -> HttpResponse:
    """Shows the user's name and email: a page only that user may see."""
    user = request.user
    who = f"{user.get_username()} <{user.email}>" if user.is_authenticated else "nobody"
    return HttpResponse(f"private page of {who}: {names()}")


def change_password(request: HttpRequest) -> HttpResponse:
    """Not cached: a POST that changes the user's password and keeps this client logged in."""
    request.user.set_password(request.POST["password"])
    request.user.save()
    update_session_auth_hash(request, request.user)
    return HttpResponse("changed")


@cached_view_as(Product)
def greeting_page(request: HttpRequest) -> TemplateResponse:
    """Depends on the user through its template only (the auth context processor)."""
    return TemplateResponse(request, "testapp/greeting.html", {"products": Product.objects.all()})


@cached_view_as(Product)
def product_form(request: HttpRequest) -> HttpResponse:
    """Holds a CSRF token, like a page with {% csrf_token %}."""
    return HttpResponse(f"{names()} <input name=csrfmiddlewaretoken value={get_token(request)}>")


@cached_view_as(Product)
def with_status(request: HttpRequest, status: int) -> HttpResponse:
    return HttpResponse(names(), status=status)


@cached_view_as(Product)
def with_cookie(request: HttpRequest) -> HttpResponse:
    response = HttpResponse(names())
    response.set_cookie("seen", "yes")
    return response


@cached_view_as(Product)
def with_set_cookie_header(request: HttpRequest, header: str) -> HttpResponse:
    """Sets a Set-Cookie header, named ``header``, by hand: a new token each time."""
    response = HttpResponse(names())
    token = f"token={uuid.uuid4().hex}; Path=/"
    if request.GET.get("via") == "headers":
        response.headers[header] = token
    else:
        response[header] = token
    return response


@cached_view_as(Product)
def streaming(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(iter([names()]))


@cached_view_as(Product)
def with_message(request: HttpRequest) -> HttpResponse:
    messages.info(request, "welcome back")
    return HttpResponse(names())


@cached_view_as(Product)
def counting_visits(request: HttpRequest) -> HttpResponse:
    request.session["visits"] = request.session.get("visits", 0) + 1
    return HttpResponse(f"{names()}: visit {request.session['visits']}")


@cached_view_as(Product)
def visits_seen(request: HttpRequest) -> HttpResponse:
    """Shows what the session holds without writing to it: a page per session."""
    return HttpResponse(f"{names()}: {request.session.get('visits', 0)} visits seen")


@cached_view_as(ChangeBatch)
def change_log(request: HttpRequest) -> HttpResponse:
    """Cached against a model ormbridge does not watch: refused at the request."""
    return HttpResponse(str(ChangeBatch.objects.count()))
