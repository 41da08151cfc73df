"""Models of the cache-correctness tests (issue 16): each stands for a shape of data or
manager that once made a cached read wrong. All are registered with ormbridge."""

from django.db import models
from polymorphic.models import PolymorphicModel

import ormbridge


@ormbridge.register
class Document(models.Model):
    """JSON and binary parameters, whose drivers' reprs are cut short or hold an address."""

    title = models.CharField(max_length=100)
    data = models.JSONField(default=dict)
    blob = models.BinaryField(default=b"")

    objects = ormbridge.CachedManager()

    def __str__(self) -> str:
        return self.title


@ormbridge.register
class Shelf(models.Model):
    name = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.name


class WithShelfManager(ormbridge.CachedManager):
    """A default manager that joins the shelf: an item's entry reads the shelf's table."""

    def get_queryset(self) -> models.QuerySet["Book"]:
        books: models.QuerySet[Book] = super().get_queryset()
        return books.select_related("shelf")


@ormbridge.register
class Book(models.Model):
    shelf = models.ForeignKey(Shelf, on_delete=models.CASCADE)
    title = models.CharField(max_length=100)

    objects = WithShelfManager()

    def __str__(self) -> str:
        return self.title


class PublishedManager(ormbridge.CachedManager):
    def get_queryset(self) -> models.QuerySet["Post"]:
        posts: models.QuerySet[Post] = super().get_queryset()
        return posts.filter(published=True)


@ormbridge.register
class Post(models.Model):
    """The default manager hides drafts; ``all_objects`` shows them."""

    title = models.CharField(max_length=100)
    published = models.BooleanField(default=False)

    objects = PublishedManager()
    all_objects = ormbridge.CachedManager()

    def __str__(self) -> str:
        return self.title


@ormbridge.register
class Blog(models.Model):
    name = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.name


@ormbridge.register
class Entry(models.Model):
    """A plain reverse foreign key without ``related_name``: ``blog.entry_set``."""

    blog = models.ForeignKey(Blog, on_delete=models.CASCADE)
    headline = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.headline


@ormbridge.register
class Number(models.Model):
    group = models.CharField(max_length=10)
    num = models.IntegerField()

    objects = ormbridge.CachedManager()

    def __str__(self) -> str:
        return self.group


@ormbridge.register
class Project(PolymorphicModel):
    """django-polymorphic: the parent's queryset loads each child with a follow-up query."""

    topic = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.topic


@ormbridge.register
class ArtProject(Project):
    artist = models.CharField(max_length=100)


class Unwatched(models.Model):
    """Not registered: a cached read of it cannot be kept fresh."""

    name = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.name


@ormbridge.register
class Profile(models.Model):
    """A reverse one-to-one: ``customer.profile``, which a customer may lack."""

    customer = models.OneToOneField(
        "shop.Customer", on_delete=models.CASCADE, related_name="profile"
    )
    nickname = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.nickname


class Seat(models.Model):
    """A composite primary key (Django 5.2): ormbridge refuses to register it."""

    pk = models.CompositePrimaryKey("row", "number")
    row = models.CharField(max_length=2)
    number = models.PositiveIntegerField()

    def __str__(self) -> str:
        return f"{self.row}{self.number}"
