"""The Task admin in headless Chromium: log in, create a task, schedule errors, preview, run now, history."""
from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.contrib.auth.models import User
from django.utils import timezone
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as EC

from sisy_celery import schedules
from sisy_celery.admin import local_time
from sisy_celery.callables import get_func_info
from sisy_celery.dispatch import TASK_NAME
from sisy_celery.models import Run, Task, task_with_callable
from sisy_celery.tasks import run_callable
from tests import celery_app
from tests.browser.conftest import log_in, wait
from tests.testapp import jobs, models as test_models

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

@pytest.fixture(autouse=True)
def empty_broker() -> None:
    celery_app.purge()


def type_into(browser: WebDriver, name: str, text: str) -> None:
    field = browser.find_element(By.NAME, name)
    field.clear()
    field.send_keys(text)


def preview_text(browser: WebDriver) -> str:
    return browser.find_element(By.CSS_SELECTOR, ".sisy-preview").text


def console_errors(browser: WebDriver) -> list[str]:
    """Severe console messages, less the missing favicon and the preview's 400 for a bad schedule."""
    return [entry["message"] for entry in browser.get_log("browser")
            if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]
            and not ("/preview/?schedule=*+24+" in entry["message"] and "status of 400" in entry["message"])]


def full_page_screenshot(browser: WebDriver, path: Path, width: int = 1400) -> None:
    """Resize the window to the whole page (plus the window's own frame) and save it."""
    browser.set_window_size(width, 1000)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    frame = browser.execute_script("return window.outerHeight - window.innerHeight")
    browser.set_window_size(width, max(1000, height + frame + 20))
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000


def test_create_task_with_preview_and_schedule_error(browser: WebDriver, live_server: Any, admin: User,
                                                     screenshot_dir: Path) -> None:
    for label, schedule, zone in (("hourly cleanup", "@hourly", ""), ("tokyo report", "30 9 * * 1-5", "Asia/Tokyo"),
                                  ("fast poll", "* * * * * */15", "")):
        task_with_callable(jobs.job, label=label, schedule=schedule, timezone=zone).save()
    Task.objects.filter(label="fast poll").update(last_run=timezone.now() - timedelta(seconds=20),
                                                  last_status="SUCCESS")
    log_in(browser, live_server.url)
    browser.get(f"{live_server.url}/admin/sisy_celery/task/add/")
    assert "_func_info" not in browser.page_source

    type_into(browser, "label", "browser job")
    type_into(browser, "callable", "tests.testapp.jobs.job")
    type_into(browser, "timezone", "Europe/Paris")
    type_into(browser, "schedule", "15 8 * * 1")
    wait(browser).until(lambda b: "At 08:15, only on Monday" in preview_text(b))
    runs = browser.find_elements(By.CSS_SELECTOR, ".sisy-preview li")
    assert len(runs) == 5
    first = schedules.next_run("15 8 * * 1", timezone.now(), "Europe/Paris")
    assert runs[0].text.startswith(local_time(first, ZoneInfo("Europe/Paris")))

    type_into(browser, "schedule", "* 24 * * *")
    wait(browser).until(lambda b: "field 2 (hour)" in preview_text(b))
    browser.find_element(By.NAME, "_save").click()
    error = wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, ".field-schedule .errorlist")))
    assert "field 2 (hour) '24' is not valid" in error.text
    assert not Task.objects.filter(label="browser job").exists()

    type_into(browser, "schedule", "*/10 * * * *")
    type_into(browser, "userdata", '{"who": "browser"}')
    browser.find_element(By.NAME, "_save").click()
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#result_list")))
    assert "was added successfully" in browser.find_element(By.CSS_SELECTOR, ".messagelist").text
    task = Task.objects.get(label="browser job")
    assert task._func_info == get_func_info(jobs.job)
    assert (task.schedule, task.timezone, task.userdata) == ("*/10 * * * *", "Europe/Paris", {"who": "browser"})
    assert timezone.now() < task.next_run <= timezone.now() + timedelta(minutes=10)

    table = browser.find_element(By.ID, "result_list").text
    assert "browser job" in table and "Every 10 minutes" in table and "Every 15 seconds" in table
    assert console_errors(browser) == []
    full_page_screenshot(browser, screenshot_dir / "changelist.png", width=1700)


def test_run_now_shows_the_run_in_history(browser: WebDriver, live_server: Any, admin: User,
                                          screenshot_dir: Path) -> None:
    task = task_with_callable(jobs.job, label="nightly export", schedule="30 2 * * *", timezone="Europe/Paris",
                              userdata={"account": 42})
    task.iterations = 5
    task.save()
    log_in(browser, live_server.url)
    browser.get(f"{live_server.url}/admin/sisy_celery/task/{task.pk}/change/")
    assert "No runs recorded yet." in browser.find_element(By.ID, "sisy-run-history").text
    wait(browser).until(lambda b: "At 02:30" in preview_text(b))
    assert len(browser.find_elements(By.CSS_SELECTOR, ".sisy-preview li")) == 5

    browser.find_element(By.CSS_SELECTOR, "a.sisy-run-now").click()
    browser.find_element(By.CSS_SELECTOR, "input[value='Yes, run it now']").click()
    message = wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, ".messagelist .success")))
    (published,) = celery_app.published()
    celery_id = published.headers["id"]
    assert f"Celery task id {celery_id}" in message.text
    assert published.headers["periodic_task_name"] == task.result_tag
    run = Run.objects.get(task_id=task.pk)
    assert (run.state, run.celery_id) == (Run.PUBLISHED, celery_id)
    task.refresh_from_db()
    assert task.running

    # Stand in for a worker: run the published message and store its result as the worker would.
    args = published.payload[0]
    outcome = run_callable.apply(args=args, task_id=celery_id)
    assert outcome.get() == "ok"
    assert test_models.CALLS[0][0] == "job" and test_models.CALLS[0][1]["userdata"] == {"account": 42}
    run.refresh_from_db()
    assert (run.state, run.attempt) == (Run.SUCCEEDED, 1) and run.worker
    request = SimpleNamespace(periodic_task_name=task.result_tag, task=TASK_NAME, hostname=run.worker,
                              args=args, kwargs={}, argsrepr=None, kwargsrepr=None)
    celery_app.app.backend.store_result(celery_id, outcome.get(), "SUCCESS", request=request)
    task.refresh_from_db()
    assert (task.running, task.iterations, task.last_status) == (False, 4, "SUCCESS")

    browser.get(f"{live_server.url}/admin/sisy_celery/task/{task.pk}/change/")
    history = browser.find_element(By.ID, "sisy-run-history")
    row = history.find_element(By.CSS_SELECTOR, "tbody tr")
    assert row.find_element(By.CSS_SELECTOR, ".sisy-run-state").text == "succeeded"
    cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
    slot = row.find_element(By.CSS_SELECTOR, "td:first-child time")
    assert slot.get_attribute("title") == local_time(run.slot, ZoneInfo("Europe/Paris"))
    assert cells[0] == slot.text and cells[0].endswith("ago")
    assert cells[2] == f"{run.lateness.total_seconds():.3f} s" and cells[4] == run.worker
    wait(browser).until(lambda b: "At 02:30" in preview_text(b))
    assert console_errors(browser) == []
    full_page_screenshot(browser, screenshot_dir / "change_page.png")

    row.find_element(By.LINK_TEXT, celery_id).click()
    wait(browser).until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, ".field-task_id"), celery_id))
    assert task.result_tag in browser.find_element(By.CSS_SELECTOR, ".field-periodic_task_name").text


def test_one_off_task_preview_is_not_replaced_by_its_schedule(browser: WebDriver, live_server: Any,
                                                              admin: User) -> None:
    once = Task.run_once(jobs.job, label="one-off", delay_until=timezone.now() + timedelta(minutes=30))
    log_in(browser, live_server.url)
    browser.get(f"{live_server.url}/admin/sisy_celery/task/{once.pk}/change/")
    wait(browser).until(lambda b: b.execute_script("return document.readyState") == "complete")
    time.sleep(1)  # what schedule_preview.js would fetch on load comes back well within this
    assert preview_text(browser).startswith("Once, in 29 minutes")
    assert not browser.execute_script(
        "return performance.getEntriesByType('resource').filter(e => e.name.includes('/preview/')).length")
    assert browser.find_element(By.CSS_SELECTOR, ".sisy-preview time").get_attribute("title") == local_time(
        once.next_run, once.zone)
    assert console_errors(browser) == []
