"""The admin lists the change log and resync jobs read-only, with a retry action."""

import pytest
from django.contrib.auth.models import User
from django.urls import reverse

from ormbridge import resync
from ormbridge.models import ChangeBatch, ResyncJob
from tests.factories import make_products

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def admin_client(client):
    user = User.objects.create_superuser("admin", "admin@example.com", "pw")
    client.force_login(user)
    return client


def test_failed_batches_are_listed_and_retried(admin_client, idle_queue):
    failed = ChangeBatch.objects.create(
        model="shop.product", action="update", pks=[1], state="failed", attempts=5,
        last_error="receiver exploded",
    )  # fmt: skip
    url = reverse("admin:ormbridge_changebatch_changelist")
    page = admin_client.get(url + "?state__exact=failed")
    assert page.status_code == 200
    assert b"receiver exploded" in page.content
    admin_client.post(url, {"action": "retry", "_selected_action": [failed.pk]})
    failed.refresh_from_db()
    assert (failed.state, failed.attempts) == ("enqueued", 1)
    assert idle_queue() == 1


def test_the_change_log_cannot_be_edited_in_the_admin(admin_client):
    batch = ChangeBatch.objects.create(model="shop.product", action="update", pks=[1])
    page = admin_client.get(reverse("admin:ormbridge_changebatch_change", args=[batch.pk]))
    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    assert admin_client.get(reverse("admin:ormbridge_changebatch_add")).status_code == 403


def test_an_interrupted_job_is_resumed_on_the_workers(admin_client, idle_queue):
    make_products(3)
    job = resync.start(resync.select(["shop.Product"]))
    resync.interrupt(job, "interrupted")
    url = reverse("admin:ormbridge_resyncjob_changelist")
    assert b"interrupted" in admin_client.get(url).content
    admin_client.post(url, {"action": "retry", "_selected_action": [job.pk]})
    assert idle_queue() == 1
    assert ResyncJob.objects.get().state == "interrupted"
