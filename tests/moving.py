"""shop.Customer with tenant namespaces and an opted-in payload, for a worker and a server
started by the tests (``ORMBRIDGE_TEST_SETTINGS``): a customer's events also go to
``shop.customer::<email domain>``, with the email in their payload."""

import json
from typing import Any

SETTINGS = json.dumps(
    {
        "MODELS": {
            "shop.Category": {},
            "shop.Customer": {
                "cache_timeout": 600,
                "namespaces": "tests.moving.domain",
                "payload": "tests.moving.payload",
            },
        },
        "EVENTS_PERMISSION": "tests.moving.may_subscribe",
    }
)


def domain(customer: Any) -> list[str]:
    return [customer.email.rsplit("@", 1)[1]]


def payload(customer: Any) -> dict[str, str]:
    return {"email": customer.email}


def may_subscribe(request: Any, namespace: str) -> bool:
    """Every logged-in user may follow customers: the test is about what they receive."""
    return request.user.is_authenticated and namespace.startswith("shop.customer")
