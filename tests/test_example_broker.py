"""The example project's filesystem transport: a reader never finds a message half written."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from kombu import Connection

# Loaded from its file: importing the package proj would create (and make current) its Celery app.
_SPEC = importlib.util.spec_from_file_location(
    "example_brokers", Path(__file__).resolve().parents[1] / "example" / "proj" / "brokers.py")
brokers = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(brokers)


def test_a_message_appears_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path),
               "control_folder": str(tmp_path / "control")}
    seen_while_writing: list[list[dict]] = []
    encode = brokers.str_to_bytes

    def encode_and_look(text: str) -> bytes:
        # the moment the stock transport has an empty 'celery.msg' file the reader could take
        seen_while_writing.append([json.loads(p.read_bytes()) for p in tmp_path.iterdir()
                                   if p.name.endswith(".celery.msg")])
        return encode(text)

    monkeypatch.setattr(brokers, "str_to_bytes", encode_and_look)
    with Connection("filesystem://", transport=brokers.FilesystemTransport, transport_options=options) as conn:
        # the channel's own put and get: what a publish and a worker's read come down to, without
        # the exchange and binding state kombu's virtual transports share within a process
        channel = conn.default_channel
        channel._put("celery", {"n": 1})
        channel._put("celery", {"n": 2})
        # nothing visible while the first is written; only the first, whole, while the second is
        assert [len(visible) for visible in seen_while_writing] == [0, 1]
        # (two messages of one millisecond come in either order, as with kombu's own transport)
        assert sorted((channel._get("celery") for _ in range(2)), key=str) == [{"n": 1}, {"n": 2}]
        assert list(tmp_path.glob("*.part")) == []
