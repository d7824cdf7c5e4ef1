"""Demo models: a record of every run (used by the demo and end-to-end tests), and an account."""
import os
import socket

from django.db import models
from django.db.models import F
from django.utils import timezone


class Run(models.Model):
    """One execution of a scheduled callable: which task, for which slot, when and where."""

    task_id = models.BigIntegerField()
    label = models.CharField(max_length=255)
    slot = models.DateTimeField()
    started = models.DateTimeField()
    finished = models.DateTimeField(null=True)
    worker = models.CharField(max_length=255)
    pid = models.IntegerField()

    @classmethod
    def record(cls, message, started=None):
        task = message["task"]
        return cls.objects.create(
            task_id=task.pk, label=task.label, slot=message["scheduled_for"],
            started=started or timezone.now(), finished=timezone.now(),
            worker=socket.gethostname(), pid=os.getpid(),
        )


class Account(models.Model):
    name = models.CharField(max_length=100)
    balance = models.IntegerField(default=0)

    def accrue_interest(self, message):
        """A model instance method: runs against its own row."""
        Account.objects.filter(pk=self.pk).update(balance=F("balance") + message["userdata"].get("amount", 1))
        Run.record(message)
