"""Permission hooks for the events endpoint (EVENTS_PERMISSION)."""


def products_only(request, namespace: str) -> bool:
    return request.user.is_authenticated and namespace.startswith("shop.product")


def own_customer_orders(request, namespace: str) -> bool:
    """Per tenant, as docs/events.md shows: a user sees ``shop.order::customer-<id>`` only for
    the customer with their e-mail address, other namespaces by the default rule."""
    from ormbridge.views import may_subscribe
    from shop.models import Customer

    label, _, tenant = namespace.partition("::")
    if not may_subscribe(request, label):
        return False
    if not tenant:
        return True
    own = Customer.objects.filter(email=request.user.email).values_list("pk", flat=True).first()
    return own is not None and tenant == f"customer-{own}"
