"""Celery message signing as docs/security.md configures it: workers accept only signed messages.

``setup_security`` disables every other serializer in kombu's registry for the whole process, so
the check runs in a process of its own.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r'''
import base64, datetime, json, sys
from pathlib import Path

from celery import Celery
from celery.exceptions import SecurityError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from kombu import Consumer, Queue
from kombu.exceptions import ContentDisallowed, DecodeError

folder = Path(sys.argv[1])
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sisy")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
(folder / "certs").mkdir()
(folder / "worker.key").write_bytes(key.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
(folder / "worker.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
(folder / "certs" / "worker.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

app = Celery("signed", broker="memory://")
app.conf.update(  # docs/security.md, without the CELERY_ prefix of Django settings
    security_key=str(folder / "worker.key"), security_certificate=str(folder / "worker.pem"),
    security_cert_store=str(folder / "certs" / "*.pem"), security_digest="sha256",
    task_serializer="auth", event_serializer="auth", accept_content=["auth"], result_accept_content=["json"],
)
app.setup_security()
args = [1, {"func_type": "function", "module_name": "jobs.jobs", "func_name": "record",
            "func_path": "jobs.jobs.record"}, {}, "2026-01-01T00:00:00+00:00"]
outcomes = {}
with app.connection_for_write() as connection:
    queue = Queue("celery", routing_key="celery")
    producer = connection.Producer()
    received = []

    def take(count):
        with Consumer(connection, [queue], accept=app.conf.accept_content, callbacks=[lambda body, m: None],
                      on_message=received.append):
            while len(received) < count:
                connection.drain_events(timeout=5)

    app.send_task("sisy.run_callable", args=args, queue=queue, connection=connection, task_id="signed")
    take(1)
    signed = received[0]
    # Beat publishes through sisy's Dispatcher, which serializes with the app's task_serializer: signed too.
    from sisy_celery.dispatch import Dispatcher, Outgoing

    dispatcher = Dispatcher(app)
    assert dispatcher.publish([Outgoing("dispatched", args, {})]) == []
    dispatcher.close()
    take(2)
    # Forged: the same body unsigned, and the signed message with its arguments changed.
    producer.publish(json.dumps([args, {}, {}]), routing_key="celery", content_type="application/json",
                     content_encoding="utf-8", headers={"task": "sisy.run_callable", "id": "unsigned"}, declare=[queue])
    tampered = base64.b64encode(base64.b64decode(signed.body).replace(b"jobs.jobs.record", b"jobs.jobs.slowed"))
    producer.publish(tampered, routing_key="celery", content_type=signed.content_type,
                     content_encoding=signed.content_encoding, headers={"task": "sisy.run_callable", "id": "tampered"},
                     declare=[queue])
    take(4)
    for message in received:
        try:
            body = message.decode()
        except (ContentDisallowed, DecodeError, SecurityError) as exc:  # what a worker's consumer rejects
            outcomes[message.headers["id"]] = f"refused: {type(exc).__name__}"
        else:
            outcomes[message.headers["id"]] = [message.content_type, body[0]]
print(json.dumps(outcomes, sort_keys=True))
'''


def test_signed_messages_are_accepted_unsigned_and_tampered_ones_refused(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    outcomes = done.stdout.strip().splitlines()[-1]
    accepted = ('["application/data", [1, {"func_name": "record", "func_path": "jobs.jobs.record", '
                '"func_type": "function", "module_name": "jobs.jobs"}, {}, "2026-01-01T00:00:00+00:00"]]')
    assert outcomes == (f'{{"dispatched": {accepted}, "signed": {accepted}, '
                        '"tampered": "refused: DecodeError", "unsigned": "refused: ContentDisallowed"}')
