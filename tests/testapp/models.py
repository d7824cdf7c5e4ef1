"""Models and callables used by the tests (int, UUID and string primary keys)."""
import uuid

from django.db import models

CALLS: list = []


class Touchable(models.Model):
    """Abstract: it has no rows, so its methods can only be scheduled through a concrete model."""

    class Meta:
        abstract = True

    def base_touch(self, message):
        CALLS.append(("base_touch", self.pk))


class Widget(Touchable):
    name = models.CharField(max_length=50)
    touched = models.IntegerField(default=0)

    def touch(self, message):
        CALLS.append(("touch", self.pk, message))
        type(self).objects.filter(pk=self.pk).update(touched=models.F("touched") + 1)

    def no_args(self):
        CALLS.append(("no_args", self.pk))

    def two_args(self, message, extra):
        pass

    @staticmethod
    def static_job(message):
        CALLS.append(("widget_static", message))

    @classmethod
    def class_job(cls, message):
        CALLS.append(("widget_class", message))

    @property
    def exploding(self):
        raise AssertionError("properties must not be evaluated")


class UuidWidget(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4)

    def touch(self, message):
        CALLS.append(("uuid", self.pk))


class SlugWidget(models.Model):
    slug = models.CharField(max_length=20, primary_key=True)

    def touch(self, message):
        CALLS.append(("slug", self.pk))
