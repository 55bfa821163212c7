"""In a real browser, the attribution dashboards' opacity slider acts without the server
and the opacity stays when the stage moves.

Starts ``python -m custom_bokeh`` and a page that embeds its apps the way the Flask file
page does, then drives Debian's chromium with playwright.
"""
import functools
import http.server
import os
import threading

import numpy as np
import pytest

from custom_bokeh import attribution_methods, auth
from custom_keras import storage
from test_bokeh_attribution import RUN
from test_bokeh_auth import SECRET, free_port, start_server, stop_server
from test_bokeh_live import ARTIFACTS, CHROMIUM, PageHandler

sync_api = pytest.importorskip("playwright.sync_api")
TECHNIQUES = {t.key: t for t in attribution_methods.attribution_techniques()}

# The opacity of every map overlay shown: of the models reachable from the document's
# roots (the document keeps models it no longer shows for a while).
OVERLAY_ALPHAS = """() => {
    const seen = new Set(), alphas = [];
    const visit = (value) => {
        if (Array.isArray(value)) { value.forEach(visit); return; }
        if (value == null || typeof value != "object" || value.properties == null || seen.has(value))
            return;
        seen.add(value);
        if (value.constructor.__name__ == "GlyphRenderer" && value.glyph.constructor.__name__ == "Image")
            alphas.push(value.glyph.global_alpha.value ?? value.glyph.global_alpha);
        for (const property of Object.values(value.properties))
            if (!property.is_unset) visit(property.get_value());
    };
    Bokeh.documents[0].roots().forEach(visit);
    return alphas;
}"""
SET_SLIDER = """([title, value]) => {
    for (const model of Bokeh.documents[0].all_models)
        if (model.constructor.__name__ == "Slider" && model.title == title) model.value = value;
}"""


def write_stage(run_dir, key, step, signed):
    result = np.full((28, 28), 128 if signed else 0, np.uint8)
    result[:, step % 28] = 255
    storage.write_snapshot(run_dir, TECHNIQUES[key].results_file,
                           {"digit.png": {"map": result, "signed": signed, "method": key}},
                           "digit.png", {"stage": step, "epoch": 0, "batch": step, "step": step},
                           {"digit.png": {"class_index": 7, "class_source": "predicted",
                                          "probability": 0.9, "predicted_class": 7}})


@pytest.fixture(scope="module")
def open_page(tmp_path_factory):
    """open_page(app) -> a browser page with the app embedded for run RUN."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian's chromium at %s" % CHROMIUM)
    storage_dir = str(tmp_path_factory.mktemp("storage"))
    run_dir = os.path.join(storage_dir, *RUN.split("/"))
    os.makedirs(os.path.join(run_dir, "images"))
    storage.write_input_images(run_dir, {"digit.png": np.full((28, 28, 1), 90, np.uint8)})
    storage.write_techniques(run_dir, {key: {"state": "active", "interval": 10}
                                       for key in ("grad_cam", "lrp")})
    for step in (10, 20):
        write_stage(run_dir, "grad_cam", step, signed=False)
    write_stage(run_dir, "lrp", 15, signed=True)
    storage.write_run_status(run_dir, storage.RUN_FINISHED, 0)

    page_port = free_port()
    server, bokeh_url = start_server(storage_dir, extra_origins=["127.0.0.1:%d" % page_port])
    page_content = {}
    page_server = http.server.ThreadingHTTPServer(("127.0.0.1", page_port),
                                                  functools.partial(PageHandler, page_content))
    threading.Thread(target=page_server.serve_forever, daemon=True).start()
    playwright = sync_api.sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                         args=["--no-sandbox", "--disable-gpu"])

    def open_app(app):
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        script = auth.embed_script(bokeh_url, SECRET, app, 3, RUN)
        page_content["html"] = "<!doctype html><html><body>%s</body></html>" % script
        page.goto("http://127.0.0.1:%d/" % page_port)
        return page

    try:
        yield open_app
    finally:
        browser.close()
        playwright.stop()
        page_server.shutdown()
        stop_server(server)


def test_the_opacity_slider_changes_every_overlay_in_the_browser_and_stays_as_the_stage_moves(
        open_page):
    page = open_page("attribution_methods")
    page.get_by_text("Stage 3 of 3 \u00b7 step 20").wait_for(timeout=60000)
    assert page.evaluate(OVERLAY_ALPHAS) == [0.6, 0.6]
    page.evaluate(SET_SLIDER, ["Map opacity", 0.2])
    assert page.evaluate(OVERLAY_ALPHAS) == [0.2, 0.2]   # at once: no round trip
    page.evaluate(SET_SLIDER, ["", 0])                  # the stage slider, to step 10
    page.get_by_text("Stage 1 of 3 \u00b7 step 10").wait_for(timeout=30000)
    page.get_by_text("no snapshot yet at this stage").wait_for(timeout=30000)
    assert page.evaluate(OVERLAY_ALPHAS) == [0.2]
    page.evaluate(SET_SLIDER, ["", 1])                  # step 15: LRP's panel is built anew
    page.wait_for_function("() => (%s)().length == 2" % OVERLAY_ALPHAS, timeout=30000)
    assert page.evaluate(OVERLAY_ALPHAS) == [0.2, 0.2]
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "attribution_methods_live.png"), full_page=True)
    page.close()


def test_the_one_method_view_overlays_its_map_and_its_slider_acts_in_the_browser(open_page):
    page = open_page("grad_cam")
    page.get_by_text("Explains class 7 (predicted), probability 90.0 %").wait_for(timeout=60000)
    assert page.evaluate(OVERLAY_ALPHAS) == [0.6]
    page.evaluate(SET_SLIDER, ["Map opacity", 0.35])
    assert page.evaluate(OVERLAY_ALPHAS) == [0.35]
    page.close()
