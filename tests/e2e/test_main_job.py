"""The main job as a new user does it, in Debian's Chromium against the real servers.

Create a user, log in, upload ``scripts/examples/mnist_digits.py``, run it with a
sample image, watch the training-progress curve grow and every technique tab
show its images, read the epoch lines in the Output tab, then download the saved
network and load it with Keras. A screenshot of every step goes to
``test-artifacts/e2e/``. The same again with ``VISUALIZER_RUNNER=ray``: the run is a
job on a local Ray head, and the user sees no difference.
"""
import re

import numpy as np
import pytest
from PIL import Image

from custom_keras import registry
from e2e.harness import REPO_ROOT, Servers, bokeh_state, screenshot, wait_for

EXAMPLE = REPO_ROOT / "scripts" / "examples" / "mnist_digits.py"
SAMPLE_IMAGE = REPO_ROOT / "scripts" / "examples" / "images" / "digit_3.png"
RUN_TIMEOUT_S = 240
PAGE_TIMEOUT_MS = 30000

SNAPSHOT_PATTERN = re.compile(r"Snapshot (\d+) of ")
ERROR_WORDS = ("Refused", "Could not", "Access refused", "no image results")


def shown_snapshot(state):
    """The snapshot number (counted from 1) in the dashboard's snapshot label, or None."""
    for text in state["texts"]:
        match = SNAPSHOT_PATTERN.search(text)
        if match:
            return int(match.group(1))
    return None


def open_tab(page, title):
    page.get_by_role("navigation").get_by_role("link", name=title, exact=True).click()
    page.wait_for_load_state("domcontentloaded")


@pytest.mark.slow
def test_new_user_trains_the_mnist_example_and_watches_it(browser, servers, tmp_path):
    _main_job(browser, servers, tmp_path)


@pytest.mark.slow
@pytest.mark.ray
def test_the_main_job_is_the_same_when_runs_are_jobs_on_ray(browser, ray_head,
                                                             tmp_path_factory, tmp_path):
    ray_servers = Servers(tmp_path_factory.mktemp("ray-servers"), VISUALIZER_RUNNER="ray",
                          VISUALIZER_RAY_ADDRESS=ray_head.address, VISUALIZER_MAX_UPLOAD_MB="2",
                          **ray_head.client_env)
    ray_servers.start()
    try:
        _main_job(browser, ray_servers, tmp_path)
    finally:
        ray_servers.cleanup()


def _main_job(browser, servers, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    page = context.new_page()
    failed_requests = []  # every page, script and dashboard request must succeed
    page.on("response", lambda response: response.status >= 400 and failed_requests.append(
        "%d %s" % (response.status, response.url)))
    try:
        _walk_through(page, servers, tmp_path)
    finally:
        context.close()
    assert failed_requests == []  # the favicon included


def _walk_through(page, servers, tmp_path):
    # A new user: the home page asks to log in; create a user from there.
    page.goto(servers.url + "/")
    assert "/auth/login" in page.url
    screenshot(page, "01_login")
    page.get_by_role("link", name="Create one").click()
    page.get_by_label("Username").fill("new_user_1")
    page.get_by_label("Password", exact=True).fill("correct horse 1")
    page.get_by_label("Confirm password").fill("correct horse 1")
    screenshot(page, "02_register")
    page.get_by_role("button", name="Create user").click()
    # creating the user logged them in: their (empty) file list
    assert "User new_user_1 created; you are logged in." in page.inner_text("main")
    assert "You have no files yet" in page.inner_text("main")
    screenshot(page, "03_empty_file_list")

    # Upload the example.
    page.get_by_role("link", name="Upload file").click()
    page.set_input_files("input[name=file]", str(EXAMPLE))
    page.get_by_label("Tags").fill("mnist e2e")
    screenshot(page, "04_upload_form")
    page.get_by_role("button", name="Upload").click()
    assert page.inner_text("h1") == "mnist_digits.py"
    assert "mnist_digits.py was uploaded" in page.inner_text("main")
    assert "register_deep_visualization" in page.inner_text(".code")
    overview_url = page.url
    screenshot(page, "05_overview_uploaded")

    # Run it with a sample image.
    page.get_by_role("button", name="Run", exact=True).click()
    dialog = page.locator("dialog#run-dialog")
    dialog.get_by_label("Image file(s) to upload").set_input_files(str(SAMPLE_IMAGE))
    screenshot(page, "06_run_dialog")
    dialog.get_by_role("button", name="Run", exact=True).click()
    assert "mnist_digits.py was queued to run" in page.inner_text("main")
    screenshot(page, "07_queued")

    # The training-progress curve grows while the run goes.
    open_tab(page, "Training progress")
    first = wait_for(lambda: (lambda n: n if n > 0 else None)(bokeh_state(page)["progress"]),
                     RUN_TIMEOUT_S, interval=0.5, what="the first training-progress rows")
    screenshot(page, "08_training_progress_first_rows")
    grown = wait_for(lambda: (lambda n: n if n > first else None)(bokeh_state(page)["progress"]),
                     RUN_TIMEOUT_S, interval=0.5, what="the training-progress curve to grow")
    assert grown > first
    screenshot(page, "09_training_progress_grown")

    # The Output tab shows Keras' epoch lines, live.
    open_tab(page, "Output")
    wait_for(lambda: "Epoch 1/" in page.inner_text("#output"), RUN_TIMEOUT_S, interval=0.5,
             what="'Epoch 1/' in the Output tab")
    screenshot(page, "10_output_epoch_1")

    status_url = overview_url + "/status.json"
    status = wait_for(lambda: (lambda s: s if s["state"] in ("finished", "failed", "stopped")
                               else None)(page.request.get(status_url).json()),
                      RUN_TIMEOUT_S, interval=1, what="the run to end")
    assert status["state"] == "finished", (status, page.inner_text("#output"))
    page.reload()
    output_text = page.inner_text("#output")
    assert "Epoch 2/2" in output_text and "Validation loss" in output_text, output_text
    # Keras' progress bar as a terminal shows it: its last state, without colour codes.
    assert not re.search(r"[\x00-\x08\x0b-\x1f]", output_text), repr(output_text)
    assert re.search(r"^ *(\d+)/\1 \u2501{20} ", output_text, re.MULTILINE), output_text
    screenshot(page, "11_output_finished")
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download raw output").click()
    full_output = tmp_path / "output.txt"
    download_info.value.save_as(full_output)
    assert "Epoch 1/2" in full_output.read_text(errors="replace")

    # The final training-progress plot holds every batch of both epochs.
    open_tab(page, "Training progress")
    final = wait_for(lambda: (lambda n: n if n > grown else None)(bokeh_state(page)["progress"]),
                     60, interval=0.5, what="the whole training-progress curve")
    assert final >= 2 * 47  # 6000 digits in batches of 128: 47 batches per epoch
    screenshot(page, "12_training_progress_final")

    # Every snapshot technique shows images of a snapshot after the first.
    appendix_c = [t for t in registry.SNAPSHOT_TECHNIQUES if t.family is None]  # the example's
    for number, technique in enumerate(appendix_c, start=13):
        open_tab(page, technique.title)
        state = wait_for(lambda: (lambda s: s if s["images"] and (shown_snapshot(s) or 0) > 1
                                  else None)(bokeh_state(page)),
                         60, interval=0.5, what="images of snapshot > 1 in %s" % technique.title)
        assert not [t for t in state["texts"] if t.startswith(ERROR_WORDS)], state["texts"]
        assert state["slider_ends"] and max(state["slider_ends"]) >= 1, state
        assert page.locator(".dashboard canvas").count() > 0
        screenshot(page, "%02d_%s" % (number, technique.key))

    # Download the saved network and load it with Keras.
    page.goto(overview_url)
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download network").click()
    network = tmp_path / download_info.value.suggested_filename
    download_info.value.save_as(network)
    assert network.name == "mnist_digits.keras"
    screenshot(page, "18_overview_finished")
    _check_network(network)


def _check_network(path):
    import keras
    model = keras.models.load_model(path)
    assert model.output_shape == (None, 10)
    digit = np.asarray(Image.open(SAMPLE_IMAGE).convert("L"), dtype="float32")[None, :, :, None]
    probabilities = model.predict(digit / 255.0, verbose=0)
    assert probabilities.shape == (1, 10)
    assert abs(float(probabilities.sum()) - 1.0) < 1e-4
