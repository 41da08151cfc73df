"""An authentication that is not the session's, like an API token, for cached_view_as tests."""

from collections.abc import Callable

from django.contrib.auth import get_user_model
from django.http import HttpRequest, HttpResponse
from django.utils.functional import SimpleLazyObject


class HeaderUserMiddleware:
    """``request.user`` is the user named by the ``X-User`` header (after the session's)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if "X-User" in request.headers:
            name = request.headers["X-User"]
            request.user = SimpleLazyObject(lambda: get_user_model().objects.get(username=name))
        return self.get_response(request)
