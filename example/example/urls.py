import importlib.util

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("ormbridge/", include("ormbridge.urls")),
    path("products/", include("shop.urls")),
]
if importlib.util.find_spec("django_eventstream"):  # docs/eventstream.md
    urlpatterns.append(path("eventstream/", include("django_eventstream.urls")))
