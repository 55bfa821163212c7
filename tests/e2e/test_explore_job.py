"""Explore as a new user does it, in Debian's Chromium against the real servers and job.

Open the demo, read its top-5 bars, click a convolutional layer and see its maps,
enlarge one by hovering, mark two filters and see the layer's bar change, request a
deconvolution of a map and see it arrive. Then train ``scripts/examples/mnist_digits.py``
(2 epochs), download its network from the file page, upload it with a PNG as a new
exploration, and see the same views. Screenshots go to ``test-artifacts/e2e/``.
"""
import re

import pytest

from e2e.harness import REPO_ROOT, Servers, screenshot, wait_for

EXAMPLE = REPO_ROOT / "scripts" / "examples" / "mnist_digits.py"
SAMPLE_IMAGE = REPO_ROOT / "scripts" / "examples" / "images" / "digit_3.png"
PAGE_TIMEOUT_MS = 30000
JOB_TIMEOUT_S = 180  # the job imports TensorFlow and loads the model on a shared machine
JOB_TIMEOUT_MS = JOB_TIMEOUT_S * 1000
RUN_TIMEOUT_S = 300
EXPLORATION_URL = re.compile(r"/explore/\d+$")


@pytest.fixture(scope="module")
def explore_servers(tmp_path_factory):
    """Servers with the default upload limit (20 MB): the trained example's network is 7 MB,
    over the 2 MB of the shared ``servers``."""
    instance = Servers(tmp_path_factory.mktemp("explore-servers"), EPOCHS="2")
    instance.start()
    yield instance
    instance.cleanup()


@pytest.mark.slow
def test_new_user_explores_the_demo_and_then_a_network_they_trained(browser, explore_servers,
                                                                      tmp_path):
    servers = explore_servers
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    page = context.new_page()
    problems = []  # every request must succeed, no script error nor CSP violation
    page.on("response", lambda response: response.status >= 400 and problems.append(
        "%d %s" % (response.status, response.url)))
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    try:
        _register(page, servers)
        _explore_the_demo(page, servers)
        network = _train_the_example_and_download_its_network(page, servers, tmp_path)
        _explore_an_uploaded_network(page, servers, network)
    finally:
        context.close()
    assert problems == []


def _register(page, servers):
    page.goto(servers.url + "/auth/register")
    page.get_by_label("Username").fill("explorer_1")
    page.get_by_label("Password", exact=True).fill("correct horse 1")
    page.get_by_label("Confirm password").fill("correct horse 1")
    page.get_by_role("button", name="Create user").click()


def _explore_the_demo(page, servers):
    page.goto(servers.url + "/explore/")
    page.get_by_role("button", name="Open the demo").click()
    page.wait_for_url(EXPLORATION_URL)
    _see_the_views(page, "explore_demo", class_names=[str(digit) for digit in range(10)])


def _see_the_views(page, name, class_names):
    """Bars, a convolutional layer's maps, hover, two marks and a deconvolution."""
    bars = page.locator("#predictions .bar-row")
    wait_for(lambda: bars.count(), JOB_TIMEOUT_S, interval=1, what=lambda: (
        "the top-5 bars; the page says %r" % page.locator("#explore-status").inner_text()))
    screenshot(page, name + "_predictions")
    labels = bars.locator(".bar-label").all_text_contents()
    assert 1 <= len(labels) <= 5 and set(labels) <= set(class_names), labels
    values = [float(text.rstrip(" %")) for text in bars.locator(".bar-value").all_text_contents()]
    assert values == sorted(values, reverse=True) and 0 < sum(values) <= 100.05

    conv = page.locator("#architecture .node.kind-conv").first
    node_id = conv.get_attribute("data-node")
    conv.click()
    maps = page.locator("#maps .map")
    maps.first.wait_for(timeout=JOB_TIMEOUT_MS)
    count = maps.count()
    assert count > 1
    assert page.locator("#layer-title").text_content() == node_id.rsplit("/", 1)[-1]

    maps.nth(1).hover()
    assert page.locator("#enlarged-caption").text_content().startswith("Map 1 of %d" % count)
    assert page.locator("#enlarged-map").evaluate("c => c.width") > 1
    screenshot(page, name + "_layer_hover")

    bar = page.locator('#architecture .node[data-node="%s"] .marks-bar' % node_id)
    filters = page.locator("#filters .filter")
    filters.nth(0).click()
    wait_for(lambda: bar.get_attribute("data-good") == "1", 10, what="the good mark in the bar")
    filters.nth(1).dblclick()
    wait_for(lambda: bar.get_attribute("data-bad") == "1", 10, what="the bad mark in the bar")
    assert int(bar.get_attribute("data-unmarked")) == count - 2
    screenshot(page, name + "_marks")

    maps.nth(2).click()
    page.get_by_role("button", name="Deconvolution of this map").click()
    card = page.locator("#on-demand-results .compute-request").first.locator(".technique-card")
    card.wait_for(timeout=JOB_TIMEOUT_MS)
    wait_for(lambda: card.locator("img").evaluate("img => img.complete && img.naturalWidth > 0"),
             30, what="the deconvolution image to load")
    screenshot(page, name + "_deconvolution")


def _train_the_example_and_download_its_network(page, servers, tmp_path):
    page.goto(servers.url + "/upload")
    page.set_input_files("input[name=file]", str(EXAMPLE))
    page.get_by_role("button", name="Upload").click()
    overview_url = page.url
    page.get_by_role("button", name="Run", exact=True).click()
    dialog = page.locator("dialog#run-dialog")
    dialog.get_by_label("No image").check()  # the network is what this test needs
    dialog.get_by_role("button", name="Run", exact=True).click()
    status = wait_for(lambda: (lambda s: s if s["state"] in ("finished", "failed", "stopped")
                               else None)(page.request.get(overview_url + "/status.json").json()),
                      RUN_TIMEOUT_S, interval=1, what="the training run to end")
    assert status["state"] == "finished", status
    page.goto(overview_url)
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download network").click()
    network = tmp_path / download_info.value.suggested_filename
    download_info.value.save_as(network)
    return network


def _explore_an_uploaded_network(page, servers, network):
    page.goto(servers.url + "/explore/")
    page.set_input_files("input[name=model]", str(network))
    page.set_input_files("input[name=inputs]", str(SAMPLE_IMAGE))
    page.locator('form#new-exploration button.primary').click()
    page.wait_for_load_state()
    assert EXPLORATION_URL.search(page.url), (page.url, page.inner_text("body")[:1000])
    _see_the_views(page, "explore_upload", class_names=["class %d" % digit for digit in range(10)]
                   + [str(digit) for digit in range(10)])
