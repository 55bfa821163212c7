"""Every run kept, in Debian's Chromium against the real servers.

A quick script (no keras) runs while its Overview is open: its alerts appear in the
Overview's list as the run writes them, without a reload. A new version of the script
runs a second time; the run list shows both runs with their hashes (the changed one
marked) and final loss; the tabs show the run chosen from the list; deleting a run asks
first and removes it. Screenshots go to ``test-artifacts/e2e/runs_*.png``.
"""
import pytest

from e2e.harness import ENDED_STATES, WebUser, screenshot, wait_for

RUN_TIMEOUT_S = 120

# Writes its training table and, while running, two alerts a few seconds apart.
ALERTING_SCRIPT = '''"""Writes a loss row and two alerts while it runs; imports no keras."""
import json
import os
import time

from custom_keras import storage

LOSS = {loss}
run_dir = storage.resolve_run_dir(os.path.dirname(os.path.abspath(__file__)))
storage.append_rows(storage.results_path(run_dir, storage.TRAINING_PROGRESS_TABLE),
                    ["progress", "epoch", "batch", "loss"], [[1.0, 0, 10, LOSS]])
print("version with loss", LOSS, flush=True)
for number, kind in enumerate({kinds}):
    time.sleep({pause_s})
    storage.write_alert(run_dir, {{"kind": kind, "epoch": 0, "batch": number + 1,
                                   "step": number + 1, "message": "alert %d" % number,
                                   "advice": "try something"}})
time.sleep({pause_s})
'''


def alerting_script(loss, kinds=(), pause_s=0.0):
    return ALERTING_SCRIPT.format(loss=loss, kinds=list(kinds), pause_s=pause_s)


@pytest.fixture(scope="module")
def user(playwright, servers):
    user = WebUser(playwright, servers, "runs_user").register_and_login()
    yield user
    user.request.dispose()


@pytest.fixture
def page(browser, user):
    context = browser.new_context(viewport={"width": 1280, "height": 900},
                                  storage_state=user.request.storage_state())
    yield context.new_page()
    context.close()


def alert_rows(page):
    return page.locator("#alerts tbody tr")


def test_a_runs_alerts_appear_on_its_overview_while_it_runs(page, servers, user):
    script_id = user.upload_script("alerting.py", alerting_script(
        0.5, ["loss_not_decreasing", "nan_loss"], pause_s=4))
    user.run(script_id)
    user.wait_for_state(script_id, "running", RUN_TIMEOUT_S)
    page.goto("%s/scripts/%d" % (servers.url, script_id))
    page.evaluate("window.loadedOnce = true")  # gone if the page reloads
    wait_for(lambda: alert_rows(page).count() == 1 or None, 30, interval=0.3,
             what="the first alert on the Overview")
    screenshot(page, "runs_alerts_live")
    wait_for(lambda: alert_rows(page).count() == 2 or None, 30, interval=0.3,
             what="the second alert on the Overview")
    assert user.status(script_id)["state"] == "running"
    assert page.evaluate("window.loadedOnce") is True  # shown live, not by a reload
    assert alert_rows(page).first.inner_text().startswith("nan loss")  # newest first
    assert page.inner_text("#run-alert-count") == "2"  # the run list's count too
    user.wait_for_state(script_id, ENDED_STATES, RUN_TIMEOUT_S)


def test_two_runs_are_listed_and_each_shown_on_every_tab(page, servers, user):
    script_id = user.upload_script("versions.py", alerting_script(0.75))
    user.run(script_id)
    assert user.wait_for_state(script_id, ENDED_STATES, RUN_TIMEOUT_S)["state"] == "finished"
    overview = "%s/scripts/%d" % (servers.url, script_id)
    page.goto(overview)
    # a new version of the script, through the Overview's dialog
    page.get_by_role("button", name="New version").click()
    dialog = page.locator("dialog#replace-dialog")
    dialog.locator("input[type=file]").set_input_files(files=[{
        "name": "versions.py", "mimeType": "text/x-python",
        "buffer": alerting_script(0.25).encode()}])
    dialog.get_by_role("button", name="Replace").click()
    assert "versions.py was replaced by the new version" in page.inner_text("main")
    user.run(script_id)
    assert user.wait_for_state(script_id, ENDED_STATES, RUN_TIMEOUT_S)["state"] == "finished"
    page.goto(overview)
    rows = page.locator(".runs-table tbody tr")
    assert rows.count() == 2
    newest, first = rows.nth(0).inner_text(), rows.nth(1).inner_text()
    assert newest.startswith("2") and "loss 0.25" in newest and "Finished" in newest
    assert first.startswith("1") and "loss 0.75" in first
    assert rows.nth(0).locator("code.hash-changed").count() == 1
    assert rows.nth(1).locator("code.hash-changed").count() == 0
    screenshot(page, "runs_list_two_runs")

    rows.nth(1).get_by_role("link", name="1", exact=True).click()
    assert "?run=" in page.url
    assert "run 1" in page.inner_text("h1")
    assert "LOSS = 0.75" in page.inner_text(".code")  # the script as run 1 ran it
    page.get_by_role("navigation").get_by_role("link", name="Output", exact=True).click()
    assert "run=" in page.url
    assert "version with loss 0.75" in page.inner_text("#output")
    screenshot(page, "runs_output_of_run_1")

    page.goto(overview)
    page.once("dialog", lambda confirm: confirm.accept())
    page.locator(".runs-table tbody tr").nth(1).get_by_role("button", name="Delete").click()
    assert "Run 1 of versions.py and all its results were deleted." in page.inner_text("main")
    assert page.locator(".runs-table tbody tr").count() == 1
