"""A permission hook for the events endpoint: products yes, orders no."""


def products_only(request, namespace: str) -> bool:
    return request.user.is_authenticated and namespace.startswith("shop.product")
