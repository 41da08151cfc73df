"""URLs of the test views (``@pytest.mark.urls("tests.testapp.urls")``)."""

from django.urls import path

from tests.testapp import views

urlpatterns = [
    path("products/", views.product_names),
    path("greeting/", views.greeting),
    path("private/", views.private_page),
    path("password/", views.change_password),
    path("greeting-page/", views.greeting_page),
    path("form/", views.product_form),
    path("status/<int:status>/", views.with_status),
    path("cookie/", views.with_cookie),
    path("set-cookie-header/<str:header>/", views.with_set_cookie_header),
    path("streaming/", views.streaming),
    path("message/", views.with_message),
    path("visits/", views.counting_visits),
    path("visits-seen/", views.visits_seen),
    path("change-log/", views.change_log),
]
