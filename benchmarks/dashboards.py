"""Benchmarks of the dashboards in a real browser (issue items 5 and 6).

Starts ``python -m custom_bokeh`` on a free port with a fresh secret and a
temporary storage folder, serves a tiny page that embeds
``custom_bokeh.auth.embed_script`` the way the Flask file page does, and drives
Debian's chromium with playwright:

- live latency: snapshots written one by one into the run folder, each timed
  from the moment its write begins to the first animation frame in which the
  page shows its stage label and its prediction (the browser's ``Date.now()``
  and Python's ``time.time()`` read the same clock);
- the layer activations dashboard of a layer with 512 filters: time from
  navigation start until the Bokeh document has drawn every view;
- bytes per training-progress update: websocket bytes the browser receives for
  one new row early in a run and after thousands of rows.

Run with ``.venv/bin/python -m benchmarks.dashboards``.
"""
import argparse
import functools
import http.server
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from playwright.sync_api import sync_playwright

from custom_bokeh import auth
from custom_keras import storage

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
USER_ID = 1
RUN_REL_DIR = storage.run_rel_dir(1, "benchmark.py", 1)
SERVER_START_TIMEOUT_S = 60
WAIT_MS = 30000
PROGRESS_COLUMNS = ["progress", "epoch", "batch", "accuracy", "loss"]

# Records, once per stage, the first animation frame whose page shows both the
# stage label and the prediction of that stage. Bokeh draws its widgets inside
# shadow roots, so every shadow root's text is read.
WATCH_STAGES = r"""() => {
    window.stageShown = {};
    const label = /Stage (\d+) \u00b7/, prediction = /Predicted class (\d+) /;
    function shadowRoots(node, found) {
        for (const element of node.querySelectorAll("*")) {
            if (element.shadowRoot) {
                found.push(element.shadowRoot);
                shadowRoots(element.shadowRoot, found);
            }
        }
        return found;
    }
    function frame() {
        let stage, predicted;
        for (const root of shadowRoots(document, [])) {
            const text = root.textContent || "";
            stage = stage ?? label.exec(text)?.[1];
            predicted = predicted ?? prediction.exec(text)?.[1];
        }
        if (stage !== undefined && stage === predicted && !(stage in window.stageShown)) {
            window.stageShown[stage] = Date.now();
        }
        requestAnimationFrame(frame);
    }
    requestAnimationFrame(frame);
}"""

# Resolves, one frame after the Bokeh document reports every view drawn, to the
# milliseconds since navigation start.
RENDERED_AT = """() => new Promise(resolve => {
    function frame() {
        const doc = window.Bokeh && Bokeh.documents[0];
        if (doc && doc.is_idle) {
            requestAnimationFrame(() => resolve(performance.now()));
        } else {
            requestAnimationFrame(frame);
        }
    }
    frame();
})"""

# True once the training-progress page holds ``count`` batch rows.
BROWSER_HAS_ROWS = """count => {
    const rows = window.Bokeh && Bokeh.documents[0]?.get_model_by_name("batch_rows");
    return rows && rows.data.progress && rows.data.progress.length == count;
}"""

# Figure titles are drawn on canvas, so they are read from the Bokeh document.
SHOWN_TITLES = """() => Bokeh.documents[0].all_models ? [...Bokeh.documents[0].all_models]
    .filter(model => model.type === "Title").map(model => model.text) : []"""


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _PageHandler(http.server.BaseHTTPRequestHandler):
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


class DashboardSite:
    """The Bokeh server, a page server and chromium, for one benchmark session.

    Use as a context manager; ``run_dir`` is the fixture run folder that the
    pages show, ``open_page(app)`` opens one technique's dashboard in a new tab.
    """

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="bench-dashboards-")
        self.storage_dir = os.path.join(self.root, "storage")
        self.run_dir = os.path.join(self.storage_dir, RUN_REL_DIR)
        self.secret_key = secrets.token_urlsafe(48)
        self.page_port, self.bokeh_port = free_port(), free_port()
        self.bokeh_url = "http://127.0.0.1:%d" % self.bokeh_port
        self._page = {}
        self._server = self._page_server = self._playwright = self._browser = None

    def __enter__(self):
        if not os.path.exists(CHROMIUM):
            sys.exit("benchmarks.dashboards needs Debian's chromium at %s (apt-get install chromium)"
                     % CHROMIUM)
        os.makedirs(self.run_dir)
        try:
            self._start_bokeh()
            self._page_server = http.server.ThreadingHTTPServer(
                ("127.0.0.1", self.page_port), functools.partial(_PageHandler, self._page))
            threading.Thread(target=self._page_server.serve_forever, daemon=True).start()
            self._playwright = sync_playwright().start()
            self._browser = self._playwright.chromium.launch(executable_path=CHROMIUM,
                                                             args=CHROMIUM_ARGS)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info):
        if self._browser:
            self._browser.close()
        if self._playwright:
            self._playwright.stop()
        if self._page_server:
            self._page_server.shutdown()
        if self._server:
            self._server.terminate()
            try:
                self._server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._server.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def _start_bokeh(self):
        self._log = open(os.path.join(self.root, "bokeh.log"), "w+")
        env = dict(os.environ, VISUALIZER_SECRET_KEY=self.secret_key)
        self._server = subprocess.Popen(
            [sys.executable, "-m", "custom_bokeh", "--port", str(self.bokeh_port),
             "--address", "127.0.0.1", "--storage-dir", self.storage_dir,
             "--allow-websocket-origin", "127.0.0.1:%d" % self.page_port],
            cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + SERVER_START_TIMEOUT_S
        while time.time() < deadline:
            if self._server.poll() is not None:
                self._log.seek(0)
                raise RuntimeError("python -m custom_bokeh exited: %s" % self._log.read())
            try:
                with socket.create_connection(("127.0.0.1", self.bokeh_port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("python -m custom_bokeh did not listen within %d s" % SERVER_START_TIMEOUT_S)

    def open_page(self, app, before_goto=None):
        """A new tab showing ``app`` for the fixture run, embedded as the Flask file page does.

        Args:
            app: the technique key, e.g. ``"saliency_maps"``.
            before_goto: optional ``function(page)`` called before navigating, e.g.
                to listen to the websocket from its start.
        """
        page = self._browser.new_page(viewport={"width": 1200, "height": 900})
        script = auth.embed_script(self.bokeh_url, self.secret_key, app, USER_ID, RUN_REL_DIR)
        self._page["html"] = "<!doctype html><html><body>%s</body></html>" % script
        if before_goto:
            before_goto(page)
        page.goto("http://127.0.0.1:%d/" % self.page_port)
        return page


def write_saliency(run_dir, stage):
    """One saliency snapshot whose stage and predicted class are both ``stage``."""
    result = np.zeros((28, 28, 1), np.uint8)
    result[stage % 20:stage % 20 + 8, 8:20] = 255
    storage.write_snapshot(run_dir, "saliency_maps.pickle", {"digit.png": result}, "digit.png",
                           {"stage": stage, "epoch": 0, "batch": 10 * stage, "step": 10 * stage},
                           {"digit.png": {"predicted_class": stage, "confidence": 0.9}})


def live_latency(site, snapshots):
    """Item 5: seconds from a saliency snapshot being written to the page showing it.

    Snapshots come at irregular intervals, so they meet the dashboard's polling
    at every phase.

    Args:
        site: a ``DashboardSite``.
        snapshots: number of snapshots to time.

    Returns:
        The latencies in seconds.
    """
    storage.write_input_images(site.run_dir, {"digit.png": np.full((28, 28, 1), 60, np.uint8)})
    write_saliency(site.run_dir, 0)
    page = site.open_page("saliency_maps")
    page.get_by_text("snapshot 1 of 1").wait_for(timeout=WAIT_MS)
    page.evaluate(WATCH_STAGES)
    rng = np.random.default_rng(0)
    latencies = []
    for stage in range(1, snapshots + 1):
        written = time.time()
        write_saliency(site.run_dir, stage)
        page.wait_for_function("stage => stage in window.stageShown", arg=str(stage), timeout=WAIT_MS)
        shown_ms = page.evaluate("stage => window.stageShown[stage]", str(stage))
        latencies.append(shown_ms / 1000.0 - written)
        time.sleep(rng.uniform(0.1, 0.6))
    page.close()
    return latencies


def layer_render(site, filters, repeats):
    """Item 6: seconds from opening the layer activations dashboard to all views drawn.

    Args:
        site: a ``DashboardSite``.
        filters: filters of the one convolutional layer, 26x26 maps each.
        repeats: page loads; the best counts.
    """
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 256, size=(filters, 26, 26), dtype=np.uint8)
    storage.write_input_images(site.run_dir, {"digit.png": np.full((28, 28, 1), 60, np.uint8)})
    storage.write_snapshot(site.run_dir, "layer_activations.pickle",
                           {"digit.png": [("Layer 1: conv2d", maps)]}, "digit.png",
                           {"stage": 0, "epoch": 0, "batch": 0, "step": 0})
    times = []
    for _ in range(repeats):
        page = site.open_page("layer_activations")
        times.append(page.evaluate(RENDERED_AT) / 1000.0)
        assert page.evaluate(SHOWN_TITLES).count("Layer 1: conv2d \u2014 %d \u00d7 26 \u00d7 26 "
                                                 "(filters \u00d7 H \u00d7 W)" % filters) == 1
        page.close()
    return min(times)


class _FrameBytes:
    """Counts the bytes of every websocket frame a page receives."""

    def __init__(self):
        self.total = 0

    def listen(self, page):
        page.on("websocket", lambda socket: socket.on("framereceived", self._count))

    def _count(self, payload):
        self.total += len(payload.encode("utf-8") if isinstance(payload, str) else payload)


def _append_rows(path, first, count):
    for batch in range(first, first + count):
        storage.append_row(path, PROGRESS_COLUMNS,
                           [batch / 469, batch // 469, batch % 469, 0.5 + 0.4 * np.sin(batch), 1.0 / (1 + batch)])


def progress_update_bytes(site, updates, grown_rows):
    """Item 6: websocket bytes per new training-progress row, early and after ``grown_rows`` rows.

    Args:
        site: a ``DashboardSite``.
        updates: single-row updates measured at each point.
        grown_rows: rows the run has written before the second measurement.

    Returns:
        ``(bytes per update early, bytes per update late)``.
    """
    table = storage.results_path(site.run_dir, "training_progress.tsv")
    _append_rows(table, 0, 10)
    frames = _FrameBytes()
    page = site.open_page("training_progress", before_goto=frames.listen)

    def wait_for_rows(count):
        page.wait_for_function(BROWSER_HAS_ROWS, arg=count, timeout=WAIT_MS)

    def bytes_per_update(rows):
        start = frames.total
        for row in range(rows, rows + updates):
            _append_rows(table, row, 1)
            wait_for_rows(row + 1)
        return (frames.total - start) / updates, rows + updates

    wait_for_rows(10)
    early, rows = bytes_per_update(10)
    _append_rows(table, rows, grown_rows)
    rows += grown_rows
    wait_for_rows(rows)
    late, rows = bytes_per_update(rows)
    page.close()
    return early, late


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--snapshots", type=int, default=20, help="snapshots timed for the live latency")
    args = parser.parse_args()
    with DashboardSite() as site:
        latencies = live_latency(site, args.snapshots)
        median = statistics.median(latencies)
        print("live latency, snapshot written -> shown in chromium (%d snapshots): median %.0f ms, "
              "max %.0f ms  target median <= 1000 ms: %s" % (
                  len(latencies), median * 1e3, max(latencies) * 1e3,
                  "met" if median <= 1.0 else "NOT met"), flush=True)
        render_s = layer_render(site, filters=512, repeats=3)
        print("layer activations dashboard, 512 filters of 26x26: drawn %.0f ms after navigation "
              "start (best of 3)  target <= 2000 ms: %s" % (
                  render_s * 1e3, "met" if render_s <= 2.0 else "NOT met"), flush=True)
        early, late = progress_update_bytes(site, updates=10, grown_rows=5000)
        print("training progress, websocket bytes per one-row update: %.0f B after 10 rows, %.0f B "
              "after 5,020 rows, ratio %.2f  target ~1: %s" % (
                  early, late, late / early, "met" if late / early <= 1.1 else "NOT met"), flush=True)


if __name__ == "__main__":
    main()
