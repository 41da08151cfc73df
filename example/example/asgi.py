"""ASGI entry point: ``uvicorn example.asgi:application`` (the events stream wants ASGI)."""

import os

from django.conf import settings
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example.settings")
application = get_asgi_application()
if settings.DEBUG:  # the example serves its own static files; a real site lets its web server
    application = ASGIStaticFilesHandler(application)
