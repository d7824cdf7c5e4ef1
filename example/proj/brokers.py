"""kombu's filesystem transport with messages written atomically.

kombu's reader moves a message file away and reads it without taking the writer's lock,
so it can read a file the publisher has created but not yet filled, and the worker stops
on the JSON error (celery/kombu#1551). Here a message is written under a name the reader
skips, then renamed into place: the reader sees whole messages only.
"""
import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        partial = os.path.join(self.data_folder_out, f".{name}.part")  # no 'QUEUE.msg' suffix: skipped
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, os.path.join(self.data_folder_out, name))
        except OSError as exc:
            raise ChannelError(f"Cannot add file {name!r} to directory") from exc


class FilesystemTransport(filesystem.Transport):
    Channel = Channel
