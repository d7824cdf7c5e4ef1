"""Headless Chromium from Debian's packages, driven by Selenium, for the admin browser tests.

The browser is installed with apt when it is missing (never downloaded by Selenium
or a test helper), so a fresh CI machine needs nothing set up by hand; the test run
says so on the terminal before it does.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from django.contrib.auth.models import User
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1000",
)
TIMEOUT = 10


def install_chromium(say: Callable[[str], None]) -> None:
    """Install Debian's chromium and chromium-driver if either binary is missing, saying so first."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    say("browser tests: chromium or chromedriver is missing; installing Debian's chromium and "
        "chromium-driver packages (apt-get update, apt-get install -y chromium chromium-driver)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "chromium", "chromium-driver"], check=True, env=env,
                   stdout=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def chromium(pytestconfig: pytest.Config) -> None:
    def say(text: str) -> None:
        """Print past pytest's output capture: installing system packages is never silent."""
        with pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
            print(f"\n{text}", flush=True)

    install_chromium(say)


@pytest.fixture
def browser(chromium: None) -> Iterator["WebDriver"]:
    """A fresh headless Chromium with an empty profile; Selenium Manager is never consulted."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="sisy-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
        try:
            yield driver
        finally:
            driver.quit()


@pytest.fixture
def screenshot_dir() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@pytest.fixture
def artefacts() -> Path:
    """Where screenshots for CI to keep go: $SISY_ARTEFACTS, else build/artefacts/ (ignored by git)."""
    folder = Path(os.environ.get("SISY_ARTEFACTS") or ROOT / "build" / "artefacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def admin(transactional_db: None) -> "User":
    from django.contrib.auth.models import User

    return User.objects.create_superuser("admin", "admin@example.com", "secret-pw")


def wait(browser: "WebDriver") -> "WebDriverWait":
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, TIMEOUT)


def log_in(browser: "WebDriver", base: str) -> None:
    """Log in as the ``admin`` fixture's superuser and wait for the admin index."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    browser.get(f"{base}/admin/login/?next=/admin/")
    browser.find_element(By.NAME, "username").send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys("secret-pw")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait(browser).until(EC.text_to_be_present_in_element((By.TAG_NAME, "h1"), "Site administration"))
