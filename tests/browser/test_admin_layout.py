"""The Task change list fits a laptop screen: no horizontal scrolling at 1280 and 1440 px.

The rows are the kind a team has after a while: long labels and callable paths, 6-field cron,
intervals, one-off tasks, a task with a problem, a failed run, a running and a disabled task.
Each width leaves a screenshot in the artefacts folder for CI to keep.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.utils import timezone
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from sisy_celery.models import Task, task_with_callable
from tests.browser.conftest import log_in
from tests.testapp import jobs

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

WIDTHS = (1280, 1440)
#: Callables of a real project live deep in its packages.
DEEP_PATH = "acme_billing.integrations.suppliers.reconciliation.jobs.reconcile_supplier_invoices_against_ledger"


def task(label: str, schedule: str, zone: str = "", func_path: str = "", **state: Any) -> Task:
    """A saved task; ``func_path`` stands for a callable deep in a project, ``state`` is what beat
    and the workers would have written (last run, status, problem, running)."""
    created = task_with_callable(jobs.job, label=label, schedule=schedule, timezone=zone)
    created.save()
    if func_path:
        state["_func_info"] = {**created._func_info, "func_path": func_path}
    if state:
        Task.objects.filter(pk=created.pk).update(**state)
    return created


@pytest.fixture
def realistic_tasks(transactional_db: None) -> None:
    now = timezone.now()
    task("Nightly reconciliation of supplier invoices against the general ledger (EU entities)",
         "30 2 * * 1-5 15", "America/Argentina/Buenos_Aires", DEEP_PATH,
         last_run=now - timedelta(hours=22), last_status="SUCCESS")
    task("Poll the payment provider for settled transfers", "every 90s", func_path=DEEP_PATH.replace(
        "reconcile_supplier_invoices_against_ledger", "poll_settled_transfers_from_payment_provider"),
         last_run=now - timedelta(seconds=40), last_status="SUCCESS", running=True)
    task("Push stock levels to the web shop every quarter of an hour during opening hours",
         "*/15 8-20 * * 1-6 30", "Europe/Paris", last_status="FAILURE", last_run=now - timedelta(minutes=14))
    task("Send the weekly KPI digest to the management team", "0 7 * * 1", "Asia/Kolkata",
         problem="ModuleNotFoundError: No module named 'acme_reports.digest_v2' (the callable's module "
                 "was renamed or removed; choose another callable)")
    task("Archive exports older than ninety days", "every 2h", "Pacific/Chatham", DEEP_PATH + "_archive",
         enabled=False)
    for minutes, label in ((3, "Resend the welcome e-mails to the March sign-ups that bounced"),
                           (60 * 26, "Recompute customer lifetime value after the pricing change")):
        Task.run_once(jobs.job, label=label, delay_until=now + timedelta(minutes=minutes))
    for n in range(8):
        task(f"Refresh exchange rates for region {n}", f"{n} */6 * * *", last_run=now - timedelta(hours=n + 1),
             last_status="SUCCESS")


def test_task_list_fits_1280_and_1440(browser: WebDriver, live_server: Any, admin: User, realistic_tasks: None,
                                      artefacts: Path) -> None:
    log_in(browser, live_server.url)
    saved = []
    for width in WIDTHS:
        browser.set_window_size(width, 1000)
        browser.get(f"{live_server.url}/admin/sisy_celery/task/")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")) == 15
        fit = browser.execute_script("""
            const table = document.getElementById("result_list");
            const box = table.closest(".results") || table.parentElement;
            return {inner: window.innerWidth, page: document.documentElement.scrollWidth,
                    table: table.scrollWidth, box: box.clientWidth};
        """)
        assert fit["inner"] == width, fit
        assert fit["page"] <= fit["inner"], f"the page scrolls sideways at {width} px: {fit}"
        assert fit["table"] <= fit["box"], f"the task list scrolls sideways at {width} px: {fit}"
        # A cron string or a date broken over two lines is hard to read: each renders as one line box.
        broken = browser.execute_script("""
            return [...document.querySelectorAll("#result_list code.sisy-schedule, #result_list time")]
                .filter(node => node.getClientRects().length !== 1).map(node => node.textContent);
        """)
        assert broken == [], f"wrapped at {width} px: {broken}"
        path = artefacts / f"task_changelist_{width}.png"
        browser.save_screenshot(str(path))
        assert path.stat().st_size > 10_000
        saved.append(path)
    print("screenshots:", *saved)
