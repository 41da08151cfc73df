"""The live product list: rows update themselves when products change, however they change."""

from django.contrib.auth.decorators import login_required, permission_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, render

from shop.models import Product

PAGE = 50


@login_required
@permission_required("shop.view_product", raise_exception=True)
def product_list(request: HttpRequest) -> HttpResponse:
    products = Product.objects.order_by("pk")[:PAGE]
    return render(request, "shop/products.html", {"products": products})


@login_required
@permission_required("shop.view_product", raise_exception=True)
def product_detail(request: HttpRequest, pk: int) -> JsonResponse:
    """The API the page refetches a changed row through (events carry no values)."""
    product = get_object_or_404(Product, pk=pk)
    return JsonResponse(
        {
            "pk": product.pk,
            "name": product.name,
            "price": str(product.price),
            "stock": product.stock,
        }
    )
