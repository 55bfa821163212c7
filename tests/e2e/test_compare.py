"""Two runs of the MNIST example with different learning rates, compared in Debian's Chromium.

The user uploads ``scripts/examples/mnist_digits.py`` twice, once with Adam's
learning rate 1e-3 and once with 1e-2 (one epoch each), runs both with a sample
image, picks the two runs on the Compare page, and sees the training curves
overlaid (one legend entry per run in every figure), the saliency maps side by
side under one stage slider that moves both panels to the chosen step, the
final-metrics table and the diff of the two scripts; while the runs train, the
curves grow without a reload. Screenshots go to
``test-artifacts/e2e/compare_*.png``.
"""
import re

import pytest

from e2e.harness import REPO_ROOT, WebUser, screenshot, wait_for
from e2e.test_requests import csp_reports

EXAMPLE = REPO_ROOT / "scripts" / "examples" / "mnist_digits.py"
SAMPLE_IMAGE = REPO_ROOT / "scripts" / "examples" / "images" / "digit_3.png"
LEARNING_RATES = ("1e-3", "1e-2")
RUN_TIMEOUT_S = 480
PAGE_TIMEOUT_S = 60

# Per Bokeh document of the page: the legend labels of every figure, the captions of the
# compared panels ("Step ..."), and the shared slider's position and end.
COMPARE_STATE_JS = """() => {
  const state = {legends: [], captions: [], slider: null, rows: 0};
  const label = (l) => typeof l === "string" ? l : (l && (l.value !== undefined ? l.value
                                                                              : l.field));
  for (const doc of (window.Bokeh && window.Bokeh.documents) || []) {
    for (const model of doc.all_models) {
      if (model.type === "Legend") {
        state.legends.push(model.items.map((item) => label(item.label)));
      }
      if (typeof model.text === "string" && model.text.startsWith("Step ")) {
        state.captions.push(model.text);
      }
      if (model.name === "shared_stage_slider") {
        state.slider = {value: model.value, end: model.end, visible: model.visible};
      }
      if (typeof model.get_column === "function" && model.columns().includes("progress")) {
        state.rows += model.get_length() || 0;
      }
    }
  }
  return state;
}"""
MOVE_SLIDER_JS = """(value) => {
  for (const doc of window.Bokeh.documents) {
    for (const model of doc.all_models) {
      if (model.name === "shared_stage_slider") { model.value = value; return true; }
    }
  }
  return false;
}"""


def variant(learning_rate):
    """The example with Adam at ``learning_rate`` for one epoch."""
    source = EXAMPLE.read_text()
    assert 'optimizer="adam"' in source and "EPOCHS = int(" in source
    source = source.replace('optimizer="adam"',
                            "optimizer=keras.optimizers.Adam(%s)" % learning_rate)
    return re.sub(r"^EPOCHS = .*$", "EPOCHS = 1", source, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def user(playwright, servers):
    user = WebUser(playwright, servers, "compare_user").register_and_login()
    yield user
    user.request.dispose()


def compare_state(page):
    return page.evaluate(COMPARE_STATE_JS)


def caption_steps(state):
    return [int(re.match(r"Step (\d+)", caption).group(1)) for caption in state["captions"]]


@pytest.mark.slow
def test_two_learning_rates_compared_curves_overlaid_and_one_slider_moves_every_panel(
        browser, servers, user):
    names = ["mnist_lr_%s.py" % rate for rate in LEARNING_RATES]
    script_ids = [user.upload_script(name, variant(rate), tags="compare")
                  for name, rate in zip(names, LEARNING_RATES)]
    for script_id in script_ids:
        user.run(script_id, image=(SAMPLE_IMAGE.name, SAMPLE_IMAGE.read_bytes()))

    context = browser.new_context(viewport={"width": 1400, "height": 1000},
                                  storage_state=user.request.storage_state())
    page = context.new_page()
    reports = csp_reports(page)  # the inline colour swatches and two embedded apps included
    failed_requests = []
    page.on("response", lambda response: response.status >= 400 and failed_requests.append(
        "%d %s" % (response.status, response.url)))
    try:
        # Pick the two runs on the Compare page.
        page.goto(servers.url + "/")
        page.get_by_role("navigation").get_by_role("link", name="Compare", exact=True).click()
        for name in names:
            page.locator("tr", has_text=name).locator("input[type=checkbox]").check()
        screenshot(page, "compare_01_picker")
        page.get_by_role("button", name="Compare").click()
        assert re.search(r"/compare\?runs=\d+&runs=\d+", page.url), page.url

        # While the runs train, the curves grow without a reload.
        first = wait_for(lambda: compare_state(page)["rows"] > 0 and compare_state(page),
                         RUN_TIMEOUT_S, interval=0.5, what="the first training rows")
        if first["rows"] < 2 * 47:  # seen before both runs had trained their epoch
            wait_for(lambda: compare_state(page)["rows"] > first["rows"], RUN_TIMEOUT_S,
                     interval=0.5, what="the curves to grow")
            screenshot(page, "compare_02_while_training")
        for script_id in script_ids:
            status = user.wait_for_state(script_id, ("finished", "failed", "stopped"),
                                         RUN_TIMEOUT_S)
            assert status["state"] == "finished", status
        page.reload()

        # The curves overlaid: every figure has one legend entry per run, named by the run.
        state = wait_for(lambda: (lambda s: s if s["legends"] and s["captions"] else None)(
            compare_state(page)), PAGE_TIMEOUT_S, interval=0.5,
            what=lambda: "the comparison dashboards: %s" % compare_state(page))
        assert len(state["legends"]) >= 2  # accuracy and loss
        for legend in state["legends"]:
            assert [label.split(" \u00b7 ")[:2] for label in legend] == [
                [names[0], "run 1"], [names[1], "run 1"]], legend
        assert state["rows"] >= 2 * 47  # every batch of both runs: 47 batches in one epoch
        screenshot(page, "compare_03_layer_activations")

        # The saliency maps side by side, both at the newest snapshot.
        assert page.get_by_label("Technique").input_value() == "layer_activations"
        with page.expect_navigation():  # choosing a technique shows it at once
            page.get_by_label("Technique").select_option("saliency_maps")
        assert "technique=saliency_maps" in page.url
        state = wait_for(lambda: (lambda s: s if len(s["captions"]) == 2 and s["slider"]
                                  else None)(compare_state(page)), PAGE_TIMEOUT_S, interval=0.5,
                         what=lambda: "two panels and the slider: %s" % compare_state(page))
        end = state["slider"]["end"]
        assert state["slider"]["visible"] and state["slider"]["value"] == end >= 5
        newest = caption_steps(state)
        assert newest[0] == newest[1] > 0
        screenshot(page, "compare_04_saliency_maps")

        # Moving the shared slider moves every panel to that step.
        shown = newest
        for position in (0, end // 2):
            assert page.evaluate(MOVE_SLIDER_JS, position)
            moved = wait_for(lambda: (lambda s: s if caption_steps(s) != shown and len(set(
                caption_steps(s))) == 1 else None)(compare_state(page)), PAGE_TIMEOUT_S,
                interval=0.3, what=lambda: "both panels to move: %s" % compare_state(page))
            shown = caption_steps(moved)
            assert shown[0] < newest[0]
            if position == 0:
                assert shown == [0, 0]
        screenshot(page, "compare_05_slider_moved")

        # The table of final metrics and the diff of the two scripts.
        table = page.inner_text(".metrics-table")
        assert "Final loss" in table and "Final accuracy" in table and "Best validation" in table
        removed = page.locator(".diff-removed").all_inner_texts()
        added = page.locator(".diff-added").all_inner_texts()
        assert removed == ["-model.compile(optimizer=keras.optimizers.Adam(1e-3), "
                           "loss=\"categorical_crossentropy\", metrics=[\"accuracy\"])"], removed
        assert added == ["+model.compile(optimizer=keras.optimizers.Adam(1e-2), "
                         "loss=\"categorical_crossentropy\", metrics=[\"accuracy\"])"], added
    finally:
        context.close()
    assert failed_requests == [] and reports == []
