"""``path("ormbridge/", include("ormbridge.urls"))`` exposes ``events/``."""

from django.urls import path

from ormbridge import views

app_name = "ormbridge"
urlpatterns = [path("events/", views.events, name="events")]
