"""The explorer page in Chromium, against fixture endpoints shaped as the Explore contract says.

What the page draws from given JSON (bars, the layer graph, maps, filters, marks,
techniques, states) is checked here without Keras or a job; the walk through with the
real job is tests/e2e/test_explore_job.py.
"""
import pytest

from e2e.explore_fixtures import FAILURE_MESSAGE, ExplorerFixtureServer, deep_net, residual_net
from e2e.harness import screenshot

PAGE_TIMEOUT_MS = 15000


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    server = ExplorerFixtureServer(tmp_path_factory.mktemp("explore-fixtures")).start()
    yield server
    server.stop()


@pytest.fixture
def page(browser, fixtures):
    """A logged-in page; any script error or CSP violation on it fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    fixtures.log_in(context)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    yield page
    context.close()
    assert errors == []


def open_scenario(page, fixtures, scenario):
    page.goto(fixtures.page_url(scenario))
    page.wait_for_selector("#architecture svg .node")


def node(page, node_id):
    return page.locator('#architecture .node[data-node="%s"]' % node_id)


def drawn_edges(page):
    return set(tuple(pair) for pair in page.eval_on_selector_all(
        "#architecture .edge", "edges => edges.map(e => [e.dataset.source, e.dataset.target])"))


def open_layer(page, node_id):
    node(page, node_id).click()
    page.wait_for_selector("#maps canvas")


def test_the_top_five_predictions_are_bars_with_class_names_sorted_by_probability(page, fixtures):
    open_scenario(page, fixtures, "demo")
    rows = page.locator("#predictions .bar-row")
    assert rows.count() == 5
    assert rows.locator(".bar-label").all_text_contents() == ["three", "eight", "five", "two", "nine"]
    assert rows.locator(".bar-value").all_text_contents() == [
        "81.0 %", "9.0 %", "5.0 %", "3.0 %", "1.0 %"]
    widths = [rows.nth(i).locator(".bar-fill").evaluate("e => e.getBoundingClientRect().width")
              for i in range(5)]
    assert widths == sorted(widths, reverse=True) and widths[0] > 8 * widths[2]


def test_choosing_another_image_shows_its_predictions(page, fixtures):
    open_scenario(page, fixtures, "demo")
    page.get_by_role("button", name="digit_7.png").click()
    assert page.locator("#predictions .bar-label").first.text_content() == "seven"
    assert page.get_by_role("button", name="digit_7.png").get_attribute("aria-pressed") == "true"


def test_the_residual_graph_draws_every_layer_and_its_skip_connections(page, fixtures):
    open_scenario(page, fixtures, "residual")
    architecture = residual_net()
    drawn = page.eval_on_selector_all("#architecture .node", "nodes => nodes.map(n => n.dataset.node)")
    assert sorted(drawn) == sorted(n["id"] for n in architecture["nodes"])
    assert drawn_edges(page) == {(e["source"], e["target"]) for e in architecture["edges"]}
    assert ("stem", "block0_add") in drawn_edges(page)  # the skip connection
    assert page.locator("#architecture-totals").text_content().startswith("2,506 parameters")
    # The skip runs beside the block, not through it: its curve stays clear of the convolutions.
    skip = page.locator('#architecture .edge[data-source="stem"][data-target="block0_add"] path')
    conv = node(page, "block0_conv1")
    skip_box, conv_box = skip.bounding_box(), conv.bounding_box()
    assert skip_box["x"] + skip_box["width"] > conv_box["x"] + conv_box["width"]
    screenshot(page, "explore_architecture_residual")


def test_parallel_branches_are_drawn_side_by_side_and_merge(page, fixtures):
    open_scenario(page, fixtures, "branching")
    boxes = {name: node(page, name).bounding_box()
             for name in ("input_layer", "branch1_conv", "branch2_reduce", "branch3_pool",
                          "concatenate")}
    firsts = [boxes[name] for name in ("branch1_conv", "branch2_reduce", "branch3_pool")]
    assert len({box["y"] for box in firsts}) == 1  # one rank
    assert len({box["x"] for box in firsts}) == 3  # side by side
    assert boxes["input_layer"]["y"] < firsts[0]["y"] < boxes["concatenate"]["y"]
    assert len(drawn_edges(page)) == 10


@pytest.mark.parametrize("scenario", ["residual", "branching", "nested", "deep"])
def test_no_two_layers_overlap_in_the_graph(page, fixtures, scenario):
    open_scenario(page, fixtures, scenario)
    boxes = page.eval_on_selector_all("#architecture .node", """nodes => nodes.map(n => {
        const box = n.getBBox(), matrix = n.transform.baseVal.consolidate().matrix;
        return [matrix.e, matrix.f, box.width, box.height]; })""")
    for i, (x1, y1, w1, h1) in enumerate(boxes):
        for x2, y2, w2, h2 in boxes[i + 1:]:
            assert x1 + w1 <= x2 or x2 + w2 <= x1 or y1 + h1 <= y2 or y2 + h2 <= y1


def test_a_nested_model_closes_into_one_node_and_opens_again(page, fixtures):
    open_scenario(page, fixtures, "nested")
    assert node(page, "features/conv2d").count() == 1
    assert ("input_layer", "features/input_layer_1") in drawn_edges(page)
    assert ("features/max_pooling2d", "flatten") in drawn_edges(page)
    page.locator('#architecture .model-box[data-node="features"] .model-box-title').click()
    assert node(page, "features/conv2d").count() == 0
    assert drawn_edges(page) == {("input_layer", "features"), ("features", "flatten"),
                                 ("flatten", "dense")}
    assert "3 layers" in node(page, "features").text_content()
    node(page, "features").click()
    assert node(page, "features/conv2d").count() == 1


def test_hovering_a_layer_shows_its_configuration(page, fixtures):
    open_scenario(page, fixtures, "demo")
    node(page, "conv2d").hover()
    tooltip = page.locator("#node-tooltip")
    assert tooltip.is_visible()
    assert "kernel_size: [3,3]" in tooltip.text_content()
    assert 'activation: "relu"' in tooltip.text_content()
    page.mouse.move(5, 5)
    assert tooltip.is_hidden()


def test_clicking_a_convolutional_layer_shows_its_maps_filters_and_statistics(page, fixtures):
    open_scenario(page, fixtures, "demo")
    open_layer(page, "conv2d_1")
    assert page.locator("#layer-title").text_content() == "conv2d_1"
    assert page.locator("#maps .map canvas").count() == 16
    assert page.locator("#maps-title").text_content().startswith("16 maps of 24×24 for digit_3.png")
    # Each map is drawn from its own values: the canvases differ.
    pixels = page.eval_on_selector_all("#maps .map canvas", """canvases => canvases.slice(0, 2)
        .map(c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data).join())""")
    assert pixels[0] != pixels[1]
    assert page.locator("#filters .filter canvas").count() == 16
    assert page.locator("#stats tbody tr").count() == 16
    assert node(page, "conv2d_1").get_attribute("class").endswith("selected")


def test_hovering_a_map_enlarges_it_beside_the_input_image(page, fixtures):
    open_scenario(page, fixtures, "demo")
    open_layer(page, "conv2d_1")
    page.locator("#maps .map").nth(3).hover()
    enlarged = page.locator("#enlarged-map")
    assert enlarged.is_visible()
    assert enlarged.evaluate("c => [c.width, c.height]") == [24, 24]
    assert page.locator("#enlarged-caption").text_content().startswith("Map 3 of 16")
    assert page.locator("#enlarged-input").get_attribute("src").endswith("/images/digit_3.png")
    screenshot(page, "explore_layer_hover")


def test_marking_filters_updates_the_bar_in_the_layers_node(page, fixtures):
    open_scenario(page, fixtures, "residual")
    open_layer(page, "block0_conv2")
    bar = node(page, "block0_conv2").locator(".marks-bar")
    assert (bar.get_attribute("data-good"), bar.get_attribute("data-unmarked")) == ("0", "8")
    filters = page.locator("#filters .filter")
    filters.nth(0).click()
    page.wait_for_function("() => document.querySelector("
                           "'.node[data-node=\"block0_conv2\"] .marks-bar').dataset.good === '1'")
    filters.nth(1).dblclick()
    page.wait_for_function("() => document.querySelector("
                           "'.node[data-node=\"block0_conv2\"] .marks-bar').dataset.bad === '1'")
    assert bar.get_attribute("data-unmarked") == "6"
    assert "mark-good" in filters.nth(0).get_attribute("class")
    assert "mark-bad" in filters.nth(1).get_attribute("class")
    assert fixtures.calls["marks"]["residual"]["block0_conv2"] == {"0": "good", "1": "bad"}
    filters.nth(0).click(modifiers=["Shift"])
    page.wait_for_function("() => document.querySelector("
                           "'.node[data-node=\"block0_conv2\"] .marks-bar').dataset.good === '0'")
    assert fixtures.calls["marks"]["residual"]["block0_conv2"] == {"1": "bad"}


def test_the_statistics_table_buttons_mark_filters_too(page, fixtures):
    open_scenario(page, fixtures, "demo")
    open_layer(page, "conv2d")
    page.get_by_role("button", name="Good (filter 2)").click()
    page.wait_for_function("() => document.querySelector("
                           "'.node[data-node=\"conv2d\"] .marks-bar').dataset.good === '1'")
    assert page.get_by_role("button", name="Good (filter 2)").get_attribute("aria-pressed") == "true"
    page.get_by_role("button", name="Clear (filter 2)").click()
    page.wait_for_function("() => document.querySelector("
                           "'.node[data-node=\"conv2d\"] .marks-bar').dataset.good === '0'")
    assert page.locator("#marks-download").get_attribute("href").endswith("/marks/download")


def test_a_requested_deconvolution_of_the_chosen_map_arrives_with_its_explanation(page, fixtures):
    open_scenario(page, fixtures, "demo")
    open_layer(page, "conv2d_1")
    page.locator("#maps .map").nth(5).click()
    page.get_by_role("button", name="Deconvolution of this map").click()
    request = page.locator("#on-demand-results .compute-request").first
    card = request.locator(".technique-card")
    card.wait_for()
    assert card.locator("img").evaluate("img => img.complete && img.naturalWidth") == 56
    assert "How it can mislead" in card.text_content()
    assert request.locator(".compute-state").count() == 0  # the spinner is gone
    assert fixtures.calls["requests"][-1] == {"technique": "deconvolution", "node": "conv2d_1",
                                              "image": "digit_3.png", "unit": 5}


def test_a_failed_technique_shows_its_message(page, fixtures):
    open_scenario(page, fixtures, "demo")
    open_layer(page, "conv2d")
    page.locator("#unit").fill("99")
    page.get_by_role("button", name="Deep visualization of this unit").click()
    failure = page.locator("#on-demand-results .compute-failed")
    failure.wait_for()
    assert failure.text_content() == "Failed: unit 99 does not exist: this layer has 8 filters"


def test_every_technique_appears_side_by_side_with_what_it_shows(page, fixtures):
    open_scenario(page, fixtures, "demo")
    page.get_by_role("button", name="Show every technique for this image").click()
    page.wait_for_selector("#all-results .compute-request.done")
    cards = page.locator("#all-results .technique-card")
    assert cards.locator("figcaption").all_text_contents() == [
        "Saliency", "Deconvolution", "Deep visualization", "Grad-CAM", "Integrated gradients"]
    for i in range(5):
        text = cards.nth(i).text_content()
        assert "What it shows" in text and "How to read it" in text and "How it can mislead" in text
    assert fixtures.calls["requests"][-1] == {"technique": "all", "node": None,
                                              "image": "digit_3.png", "unit": None}
    screenshot(page, "explore_side_by_side")


def test_a_dense_layer_shows_its_units_as_a_strip(page, fixtures):
    open_scenario(page, fixtures, "demo")
    node(page, "dense").click()
    strip = page.locator("#maps canvas.strip")
    strip.wait_for()
    assert strip.evaluate("c => [c.width, c.height]") == [10, 1]
    assert page.locator("#maps-title").text_content().startswith("10 units")
    strip.hover()
    assert page.locator("#enlarged-caption").text_content().startswith("Unit ")
    assert page.get_by_role("button", name="Grad-CAM at this layer").is_disabled()


def test_a_starting_exploration_says_so_then_shows_its_notices_and_content(page, fixtures):
    page.goto(fixtures.page_url("starting"))
    status = page.locator("#explore-status")
    status.get_by_text("Loading the model (step").wait_for()
    page.wait_for_selector("#architecture svg .node")
    assert status.is_hidden()
    assert "converted to 28×28 grey" in page.locator("#explore-notices").text_content()
    node(page, "conv2d").click()  # its first answer is "pending": the page asks again
    page.locator("#layer-status").get_by_text("computing this layer").wait_for()
    page.wait_for_selector("#maps canvas")
    assert page.locator("#layer-status").text_content() == ""


def test_a_failed_exploration_shows_its_message_and_what_to_do(page, fixtures):
    page.goto(fixtures.page_url("failed"))
    alert = page.get_by_role("alert").filter(has_text="This exploration failed")
    alert.wait_for()
    assert FAILURE_MESSAGE in alert.text_content()
    assert alert.get_by_role("link", name="start a new exploration").is_visible()
    assert page.locator("#explore-content").is_hidden()
    screenshot(page, "explore_failed")


def test_a_150_layer_network_draws_every_layer_and_zooms(page, fixtures):
    open_scenario(page, fixtures, "deep")
    assert page.locator("#architecture .node").count() == len(deep_net()["nodes"]) == 150
    assert len(drawn_edges(page)) == len(deep_net()["edges"])
    graph, box = page.locator("#architecture svg"), page.locator("#architecture")
    page.get_by_role("button", name="Whole graph").click()
    assert graph.bounding_box()["height"] <= box.bounding_box()["height"]
    page.get_by_role("button", name="Actual size").click()
    actual = graph.bounding_box()["height"]
    page.get_by_role("button", name="Zoom out").click()
    assert graph.bounding_box()["height"] == pytest.approx(actual / 1.25, rel=0.01)
    node(page, "conv2d_3").click()  # a zoomed graph still opens its layers
    page.wait_for_selector("#maps canvas")
