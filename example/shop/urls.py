from django.urls import path

from shop import views

app_name = "shop"
urlpatterns = [
    path("", views.product_list, name="products"),
    path("<int:pk>/", views.product_detail, name="product-detail"),
]
