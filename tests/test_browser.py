"""End to end in a real headless browser: the example page updates itself, no reload."""

import os
import shutil
import socket
import subprocess
import sys
from decimal import Decimal

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client

import ormbridge
from shop.models import Product
from tests.conftest import ROOT, skip_missing_tool, wait_until
from tests.factories import make_products

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def asgi_server(worker):
    """The example project under uvicorn, on the test database and services."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "example.asgi:application", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
             "ORMBRIDGE_TEST_DB_NAME": connection.settings_dict["NAME"],
             "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example")])},
    )  # fmt: skip

    def listening() -> bool:
        with socket.socket() as client:
            return client.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, 30, "uvicorn to listen")
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(10)


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        skip_missing_tool(
            "chromium", "install Debian's chromium and chromium-driver (.ci/run does it)"
        )
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER)
    )
    yield driver
    driver.quit()


def logged_in_cookie() -> dict:
    user = User.objects.create_user("shopkeeper")
    user.user_permissions.add(Permission.objects.get(codename="view_product"))
    client = Client()
    client.force_login(user)
    name = django_settings.SESSION_COOKIE_NAME
    return {"name": name, "value": client.cookies[name].value, "path": "/"}


def test_the_page_shows_a_bulk_update_without_a_reload(asgi_server, browser):
    products = make_products(20)
    target = products[7]
    browser.get(f"{asgi_server}/admin/login/")
    browser.add_cookie(logged_in_cookie())
    browser.get(f"{asgi_server}/products/")
    status = browser.find_element("id", "status")
    wait_until(lambda: status.text == "live", 30, "the page to subscribe")
    page = browser.execute_script("return performance.timeOrigin")

    ormbridge.safe_bulk_update(Product.objects.filter(pk=target.pk), price=Decimal("42.00"))

    price = browser.find_element("css selector", f"#product-{target.pk} .price")
    wait_until(lambda: price.text == "42.00", 30, "the row to show the new price")
    assert browser.execute_script("return performance.timeOrigin") == page  # no reload
    other = browser.find_element("css selector", f"#product-{products[0].pk} .price")
    assert other.text == "1.00"
