"""A real browser shows an embedded dashboard and its new snapshots without a reload.

Starts ``python -m custom_bokeh`` and a tiny page server that embeds
``auth.embed_script`` the way the Flask file page does, then drives Debian's
chromium with playwright. The session token expires before the new snapshot is
written, to show that an open session keeps working after its token expired.
"""
import functools
import http.server
import os
import threading
import time

import numpy as np
import pytest

from custom_bokeh import auth
from custom_keras import storage
from test_bokeh_auth import SECRET, free_port, start_server, stop_server

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "test-artifacts")
TOKEN_LIFETIME_S = 5


def write_saliency(run_dir, stage):
    result = np.zeros((28, 28, 1), np.uint8)
    result[4 + stage:12 + stage, 8:20] = 255
    storage.write_snapshot(run_dir, "saliency_maps.pickle", {"digit.png": result}, "digit.png",
                           {"stage": stage, "epoch": 0, "batch": 10 * stage, "step": 10 * stage},
                           {"digit.png": {"predicted_class": stage, "confidence": 0.9}})


class PageHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``page["html"]``, as the Flask file page would."""

    def __init__(self, page, *args, **kwargs):
        self.page = page
        super().__init__(*args, **kwargs)

    def do_GET(self):
        body = self.page["html"].encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A Bokeh server, a page server and a browser: (storage dir, open_page(app, lifetime))."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian's chromium at %s" % CHROMIUM)
    storage_dir = str(tmp_path_factory.mktemp("storage"))
    page_port = free_port()
    process, bokeh_url = start_server(storage_dir, extra_origins=["127.0.0.1:%d" % page_port])
    page_content = {}
    page_server = http.server.ThreadingHTTPServer(("127.0.0.1", page_port),
                                                  functools.partial(PageHandler, page_content))
    threading.Thread(target=page_server.serve_forever, daemon=True).start()
    playwright = sync_api.sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                         args=["--no-sandbox", "--disable-gpu"])

    def open_page(app, expiration_s=300):
        """Opens the app for run 3/mnist_digits/runs/1 as the Flask file page would embed it."""
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        script = auth.embed_script(bokeh_url, SECRET, app, 3, "3/mnist_digits/runs/1",
                                   expiration_s=expiration_s)
        page_content["html"] = "<!doctype html><html><body><h1>mnist_digits</h1>%s</body></html>" % script
        page.goto("http://127.0.0.1:%d/" % page_port)
        return page

    try:
        yield os.path.join(storage_dir, "3", "mnist_digits", "runs", "1"), open_page
    finally:
        browser.close()
        playwright.stop()
        page_server.shutdown()
        stop_server(process)


def test_browser_shows_a_new_snapshot_without_reload(site):
    run_dir, open_page = site
    storage.write_input_images(run_dir, {"digit.png": np.full((28, 28, 1), 60, np.uint8)})
    write_saliency(run_dir, 0)

    page = open_page("saliency_maps", expiration_s=TOKEN_LIFETIME_S)
    token_expires = time.time() + TOKEN_LIFETIME_S
    page.get_by_text("snapshot 1 of 1").wait_for(timeout=60000)
    page.get_by_text("Predicted class 0 with confidence 90.0 %").wait_for()
    assert page.locator("canvas").count() >= 2  # the input image and its map

    time.sleep(max(0.0, token_expires + 1 - time.time()))
    written = time.time()
    write_saliency(run_dir, 1)
    page.get_by_text("snapshot 2 of 2").wait_for(timeout=30000)
    latency_ms = (time.time() - written) * 1000
    page.get_by_text("Predicted class 1 with confidence 90.0 %").wait_for()
    print("\nnew snapshot shown %.0f ms after its file was written" % latency_ms)
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "saliency_live.png"), full_page=True)
    page.close()


# True once the browser's copy of the batch rows has ``count`` rows
ROWS_SHOWN = """count => {
    const doc = window.Bokeh && Bokeh.documents[0];
    const rows = doc && doc.get_model_by_name("batch_rows");
    return rows != null && rows.data.progress != null && rows.data.progress.length == count;
}"""


def test_browser_receives_new_training_rows_without_reload(site):
    run_dir, open_page = site
    table = storage.results_path(run_dir, "training_progress.tsv")
    columns = ["progress", "epoch", "batch", "accuracy", "loss"]
    for batch in range(10):
        storage.append_row(table, columns, [batch / 20, 0, batch, 0.1 + batch / 20, 2.0 - batch / 10])

    page = open_page("training_progress")
    page.wait_for_function(ROWS_SHOWN, arg=10, timeout=60000)
    for batch in range(10, 15):
        storage.append_row(table, columns, [batch / 20, 0, batch, 0.1 + batch / 20, 2.0 - batch / 10])
    page.wait_for_function(ROWS_SHOWN, arg=15, timeout=30000)
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "training_progress_live.png"), full_page=True)
    page.close()
