"""The example project as compose runs it serves the admin's CSS: DEBUG off, gunicorn, WhiteNoise.

With DEBUG off Django serves no static files, and gunicorn serves none either: without
WhiteNoise the admin's login page loads unstyled behind 404s. This runs the web service's
command with its environment (secrets made up, SQLite for PostgreSQL) after collectstatic,
as the image does at build time.
"""
from __future__ import annotations

import gzip
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.browser.conftest import wait
from tests.test_compose import EXAMPLE, compose_with, secrets_env, web_environment

pytestmark = pytest.mark.browser

STARTUP = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def compose_web(tmp_path: Path) -> Iterator[str]:
    """The base URL of compose's web command, run with the web service's environment."""
    made_up = secrets_env()
    env = web_environment(made_up, tmp_path)
    env.update(SISY_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}", CELERY_BROKER_URL="filesystem://")
    assert env["DJANGO_DEBUG"] == "0"
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput"], env=env, cwd=EXAMPLE, check=True,
                   capture_output=True, timeout=120)
    command = list(compose_with(made_up)["services"]["web"]["command"])
    assert command[:2] == ["gunicorn", "proj.wsgi"]
    port = free_port()
    command[command.index("--bind") + 1] = f"127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", *command], env=env, cwd=EXAMPLE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP
        while True:
            try:
                urllib.request.urlopen(f"{base}/admin/login/", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()
                assert time.monotonic() < deadline, "gunicorn did not answer"
                time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_login_page_is_styled_by_files_whitenoise_serves(browser: WebDriver, compose_web: str,
                                                         artefacts: Path) -> None:
    browser.get(f"{compose_web}/admin/login/")
    wait(browser).until(lambda b: b.find_elements(By.NAME, "username"))
    loaded = browser.execute_script("""
        return performance.getEntriesByType("resource").filter(entry => entry.initiatorType === "link")
            .map(entry => ({url: entry.name, status: entry.responseStatus}));
    """)
    (base_css,) = [entry for entry in loaded if "/static/admin/css/base." in entry["url"]]
    assert base_css["status"] == 200, loaded
    assert base_css["url"].endswith(".css") and base_css["url"] != f"{compose_web}/static/admin/css/base.css", \
        "the stylesheet's name carries its hash (manifest storage)"
    # The admin's CSS applies: the header has its colour, the login box its width.
    header = browser.execute_script("return getComputedStyle(document.getElementById('header')).backgroundColor")
    assert header not in ("", "transparent", "rgba(0, 0, 0, 0)")
    width = browser.execute_script("return document.getElementById('container').getBoundingClientRect().width")
    assert width < 600, "the login box is the narrow box of login.css, not the whole window"

    request = urllib.request.Request(base_css["url"], headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/css")
        assert response.headers["Content-Encoding"] == "gzip", "WhiteNoise serves the compressed copy"
        assert "immutable" in response.headers["Cache-Control"], "a hashed file may be cached for ever"
        assert b"--header-bg" in gzip.decompress(response.read())
    path = artefacts / "compose_login.png"
    browser.save_screenshot(str(path))
    print("screenshot:", path)
