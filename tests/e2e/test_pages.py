"""What the pages say and draw for every input kind and for failures, in Debian's Chromium.

The tabular and sequence examples run without an image: their dashboards draw
bars and curves, and the tabular example's deconvolution (registered although a
Dense-only model has no feature maps) says it was switched off and why. The MNIST
example run with "No image" says which techniques need an image. A script that
fails after registering its techniques gets an Overview that names the exception
and links to its traceback, and dashboards that say the run failed. Screenshots
of every page go to ``test-artifacts/e2e/pages_*.png``. The attribution example, run
with one digit, shows a snapshot on every attribution method's tab, and the side-by-side
tab appears.
"""
import pytest

from custom_keras import registry
from e2e.harness import REPO_ROOT, WebUser, bokeh_state, screenshot, wait_for

EXAMPLES = REPO_ROOT / "scripts" / "examples"
RUN_TIMEOUT_S = 300
PAGE_TIMEOUT_S = 60
# The examples below register the Appendix C techniques; the attribution methods have one
# of their own (the last test).
SNAPSHOT_TECHNIQUES = [t for t in registry.SNAPSHOT_TECHNIQUES if t.family is None]

FAILING_SCRIPT = '''"""Registers two techniques, then fails before training."""
from custom_keras import storage
import os

run_dir = storage.resolve_run_dir(os.path.dirname(os.path.abspath(__file__)))
storage.write_techniques(run_dir, {key: {
    "registered": True, "title": key, "results_file": key + ".pickle", "params": {},
    "interval": 10, "state": "registered", "reason": None, "first_snapshot_step": None,
    "input_kind": None} for key in ("saliency_maps", "layer_activations")})
print("Epoch 1/3", flush=True)
shapes = {"dense": (None, 10)}
raise ValueError("Input 0 of layer dense is incompatible with the layer: expected %s"
                 % (shapes["dense"],))
'''


@pytest.fixture(scope="module")
def user(playwright, servers):
    user = WebUser(playwright, servers, "pages_user").register_and_login()
    yield user
    user.request.dispose()


@pytest.fixture(scope="module")
def page(browser, user):
    """A browser page logged in as ``user`` (its session cookie)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900},
                                  storage_state=user.request.storage_state())
    yield context.new_page()
    context.close()


@pytest.fixture(scope="module")
def finished_runs(user):
    """{name: script id} of the examples, run without an image until they ended."""
    scripts = {}
    for name in ("tabular_features", "sequence_conv1d", "mnist_digits"):
        scripts[name] = user.upload_script(name + ".py", (EXAMPLES / (name + ".py")).read_text())
        user.run(scripts[name])
    scripts["failing"] = user.upload_script("failing.py", FAILING_SCRIPT)
    user.run(scripts["failing"])
    for name, script_id in scripts.items():
        status = user.wait_for_state(script_id, ("finished", "failed", "stopped"), RUN_TIMEOUT_S)
        assert status["state"] == ("failed" if name == "failing" else "finished"), (name, status)
    return scripts


def dashboard_texts(page, servers, script_id, technique, wanted):
    """Opens a technique tab and waits until its Bokeh texts include ``wanted(texts)``."""
    page.goto("%s/scripts/%d/techniques/%s" % (servers.url, script_id, technique.key))
    return wait_for(lambda: (lambda s: s if s["documents"] and wanted(s["texts"]) else None)(
        bokeh_state(page)), PAGE_TIMEOUT_S, interval=0.5,
        what=lambda: "%s: %s" % (technique.key, bokeh_state(page)["texts"]))


def snapshot_shown(texts):
    return any(text.startswith("Snapshot ") for text in texts)


SELECT_JS = """() => Bokeh.documents.flatMap(d => [...d.all_models])
    .filter(m => m.type === "Select" && m.visible).map(m => m.title)"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tabular_features", "sequence_conv1d"])
def test_non_image_models_get_every_technique_that_fits_drawn_in_their_form(
        page, servers, finished_runs, name):
    for technique in SNAPSHOT_TECHNIQUES:
        if name == "tabular_features" and technique.key == "deconvolutional_network":
            continue
        state = dashboard_texts(page, servers, finished_runs[name], technique, snapshot_shown)
        assert not [t for t in state["texts"] if t.startswith(("Could not", "Refused"))], state
        assert page.locator(".dashboard canvas").count() > 0
        # deep visualization grows from noise: no input choice that would change nothing
        visible_selects = page.evaluate(SELECT_JS)
        if technique.key == "deep_visualization":
            assert visible_selects == []
        else:
            assert visible_selects == ["Input"]
        screenshot(page, "pages_%s_%s" % (name, technique.key))


@pytest.mark.slow
def test_a_technique_switched_off_says_why_and_training_went_on(page, servers, finished_runs):
    technique = registry.get("deconvolutional_network")
    state = dashboard_texts(page, servers, finished_runs["tabular_features"], technique,
                            lambda texts: any("Switched off" in t for t in texts))
    [text] = [t for t in state["texts"] if "Switched off" in t]
    assert text.startswith("Switched off for this run: needs feature maps")
    assert text.endswith("Training went on without it.")
    assert not any("Register" in t or "No data yet" in t for t in state["texts"])
    screenshot(page, "pages_tabular_features_deconvolution_switched_off")


@pytest.mark.slow
def test_a_no_image_run_of_the_example_says_which_techniques_need_an_image(page, servers,
                                                                           finished_runs):
    script_id = finished_runs["mnist_digits"]
    for technique in SNAPSHOT_TECHNIQUES:
        if technique.key == "deep_visualization":  # grows from noise: needs no image
            dashboard_texts(page, servers, script_id, technique, snapshot_shown)
        else:
            state = dashboard_texts(page, servers, script_id, technique,
                                    lambda texts: any("Switched off" in t for t in texts))
            assert any("needs an image" in t for t in state["texts"]), state["texts"]
        screenshot(page, "pages_mnist_no_image_%s" % technique.key)


@pytest.mark.slow
def test_a_failed_run_names_its_exception_on_every_page(page, servers, finished_runs):
    script_id = finished_runs["failing"]
    exception = "ValueError: Input 0 of layer dense is incompatible with the layer: expected " \
                "(None, 10)"
    page.goto("%s/scripts/%d" % (servers.url, script_id))
    facts = page.inner_text(".facts")
    assert exception in facts
    screenshot(page, "pages_failed_overview")
    page.get_by_role("link", name="The traceback starts at line 2 of the output").click()
    shown = page.inner_text("#output-lines")
    assert shown.startswith("Traceback (most recent call last):") and exception in shown
    assert "Epoch 1/3" not in shown
    screenshot(page, "pages_failed_output_traceback")

    state = dashboard_texts(page, servers, script_id, registry.get("saliency_maps"),
                            lambda texts: any("failed" in t for t in texts))
    assert "The run failed before the saliency maps produced results: %s" % exception \
        in state["texts"]
    screenshot(page, "pages_failed_saliency_maps")
    # a technique the script did not register: the call to add, although the run failed
    dashboard_texts(page, servers, script_id, registry.get("deep_visualization"),
                    lambda texts: any(t.startswith("Not registered") for t in texts))
    screenshot(page, "pages_failed_deep_visualization")


@pytest.mark.slow
def test_the_attribution_example_shows_every_method_and_the_side_by_side_tab(page, servers, user):
    script_id = user.upload_script(
        "attribution_methods.py", (EXAMPLES / "attribution_methods.py").read_text())
    user.run(script_id, image=("digit_7.png", (EXAMPLES / "images" / "digit_7.png").read_bytes()))
    status = user.wait_for_state(script_id, ("finished", "failed", "stopped"), RUN_TIMEOUT_S)
    assert status["state"] == "finished", status
    for technique in registry.ATTRIBUTION_TECHNIQUES:
        state = dashboard_texts(page, servers, script_id, technique, snapshot_shown)
        assert not [t for t in state["texts"] if t.startswith(("Could not", "Refused",
                                                               "Switched off"))], state
        assert page.locator(".dashboard canvas").count() > 0
        screenshot(page, "pages_attribution_%s" % technique.key)
    comparison = registry.get("attribution_methods")
    assert page.locator("nav.tabs a", has_text=comparison.title).count() == 1
    titles = {technique.title for technique in registry.ATTRIBUTION_TECHNIQUES}
    state = dashboard_texts(page, servers, script_id, comparison,
                            lambda texts: titles <= set(texts) and any(
                                text.startswith("step ") for text in texts))
    assert not [t for t in state["texts"] if t.startswith(("Could not", "Refused"))], state
    assert page.locator(".dashboard canvas").count() > 0
    screenshot(page, "pages_attribution_methods")
