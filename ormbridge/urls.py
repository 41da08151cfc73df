"""``path("ormbridge/", include("ormbridge.urls"))`` exposes ``events/``."""

from django.urls import path

from ormbridge import views

__all__ = [
    "app_name",
    "urlpatterns",
]

app_name = "ormbridge"
urlpatterns = [path("events/", views.events, name="events")]
