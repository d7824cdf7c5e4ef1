"""Test-only hooks for the end-to-end fault tests. Do not use them in production.

``canary`` is a callable outside ``SISY_ALLOWED_MODULES`` (``['jobs']``): if a
worker ever runs it, it leaves the file ``canary`` in ``SISY_VAR_DIR``.
"""
from pathlib import Path


def canary(message):
    """Must never run: it is not under SISY_ALLOWED_MODULES."""
    from django.conf import settings

    Path(settings.VAR_DIR, "canary").write_text(repr(message.get("scheduled_for")))
