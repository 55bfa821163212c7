"""Benchmarks of the explorer page in Debian's Chromium (issue 13's targets).

- the architecture view of a 150-layer residual network (a generated
  architecture.json served by the e2e fixture endpoints): from the moment its JSON
  has arrived to the first animation frame after the graph is in the page, over 10
  page loads; target <= 2 s;
- a layer click to its activation grid shown: the real servers (``bash
  scripts/start.sh``) with the demo exploration, 10 clicks over its layers with maps,
  each timed in the page from the click to the first animation frame after the grid
  was drawn; target median <= 1 s;
- an on-demand deconvolution and a Grad-CAM: from the button's click to the result
  image loaded in the page; target <= 3 s.

Run with ``.venv/bin/python -m benchmarks.explore_browser`` (``--fixtures-only`` skips
the real servers). Prints each number and its ratio to the target.
"""
import argparse
import os
import statistics
import sys
import tempfile

from playwright.sync_api import sync_playwright

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The e2e harness (real servers, fixture endpoints) lives under tests/, imported as pytest does.
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))
from e2e.explore_fixtures import ExplorerFixtureServer, deep_net  # noqa: E402
from e2e.harness import CHROMIUM, CHROMIUM_ARGS, CSRF_PATTERN, Servers  # noqa: E402

LOADS = 10
CLICKS = 10
DRAW_TARGET_MS = 2000
CLICK_TARGET_MS = 1000
COMPUTE_TARGET_MS = 3000
JOB_TIMEOUT_MS = 240000
IN_PAGE_TIMEOUT_MS = 60000

# Records the first animation frame after the layer graph is in the page.
WATCH_GRAPH = """() => {
  new MutationObserver((records, observer) => {
    if (document.querySelector("#architecture svg .node")) {
      observer.disconnect();
      requestAnimationFrame(() => { window.graphShownAt = performance.now(); });
    }
  }).observe(document, {childList: true, subtree: true});
}"""

GRAPH_TIME = """() => {
  const entry = performance.getEntriesByType("resource")
    .filter(e => e.name.includes("architecture.json"))[0];
  return [window.graphShownAt - entry.responseEnd,
          Number(document.getElementById("architecture").dataset.drawMs)];
}"""

# Clicks a node and resolves with ms until the first frame after its maps were drawn.
CLICK_TO_GRID = """([nodeId, timeoutMs]) => new Promise((resolve, reject) => {
  const maps = document.getElementById("maps");
  const start = performance.now();
  const observer = new MutationObserver(() => {
    if (maps.querySelector("canvas")) {
      observer.disconnect();
      requestAnimationFrame(() => resolve(performance.now() - start));
    }
  });
  observer.observe(maps, {childList: true});
  setTimeout(() => reject(new Error("no grid for " + nodeId)), timeoutMs);
  document.querySelector('#architecture .node[data-node="' + nodeId + '"]')
    .dispatchEvent(new MouseEvent("click", {bubbles: true}));
})"""

# Clicks a technique button and resolves with ms until its result image has loaded.
CLICK_TO_RESULT = """([technique, timeoutMs]) => new Promise((resolve, reject) => {
  const results = document.getElementById("on-demand-results");
  const before = results.children.length;
  const start = performance.now();
  document.querySelector('button[data-technique="' + technique + '"]').click();
  (function check() {
    const request = results.children.length > before ? results.firstElementChild : null;
    const image = request && request.querySelector(".technique-card img");
    if (image && image.complete && image.naturalWidth > 0) {
      requestAnimationFrame(() => resolve(performance.now() - start));
    } else if (request && request.querySelector(".compute-failed")) {
      reject(new Error(request.querySelector(".compute-failed").textContent));
    } else if (performance.now() - start > timeoutMs) {
      reject(new Error("no " + technique + " result"));
    } else {
      setTimeout(check, 5);
    }
  })();
})"""


def report(name, values_ms, target_ms):
    median, worst = statistics.median(values_ms), max(values_ms)
    print("%-52s median %7.1f ms  max %7.1f ms  target %5d ms  median/target %.3f"
          % (name, median, worst, target_ms, median / target_ms))


def architecture_drawing(browser):
    with tempfile.TemporaryDirectory() as root:
        server = ExplorerFixtureServer(root).start()
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            server.log_in(context)
            page = context.new_page()
            page.add_init_script("(%s)()" % WATCH_GRAPH)
            shown, drawing = [], []
            for _ in range(LOADS):
                page.goto(server.page_url("deep"))
                page.wait_for_function("() => window.graphShownAt !== undefined")
                total_ms, draw_ms = page.evaluate(GRAPH_TIME)
                shown.append(total_ms)
                drawing.append(draw_ms)
            nodes = page.locator("#architecture .node").count()
            context.close()
        finally:
            server.stop()
    assert nodes == len(deep_net()["nodes"])
    report("150-layer graph: JSON arrived -> drawn (%d loads)" % LOADS, shown, DRAW_TARGET_MS)
    report("150-layer graph: layout + SVG building alone", drawing, DRAW_TARGET_MS)


def demo_exploration(browser):
    with tempfile.TemporaryDirectory() as root:
        servers = Servers(root)
        servers.start()
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            _register(context, servers)
            page = context.new_page()
            page.goto(servers.url + "/explore/")
            page.get_by_role("button", name="Open the demo").click()
            page.wait_for_url("**/explore/*")
            page.locator("#architecture svg .node").first.wait_for(timeout=JOB_TIMEOUT_MS)
            with_maps = _maps_nodes(page)
            # The job's first answer for a layer includes its computation; every click is timed.
            clicks = [page.evaluate(CLICK_TO_GRID, [with_maps[i % len(with_maps)], IN_PAGE_TIMEOUT_MS])
                      for i in range(CLICKS)]
            report("click -> activation grid shown (%d clicks, %d layers)"
                   % (CLICKS, len(with_maps)), clicks, CLICK_TARGET_MS)
            conv = page.locator("#architecture .node.kind-conv").last.get_attribute("data-node")
            page.evaluate(CLICK_TO_GRID, [conv, IN_PAGE_TIMEOUT_MS])
            for technique in ("deconvolution", "grad_cam"):
                took = [page.evaluate(CLICK_TO_RESULT, [technique, IN_PAGE_TIMEOUT_MS])
                        for _ in range(3)]
                report("%s: click -> image shown (3 requests)" % technique, took, COMPUTE_TARGET_MS)
            context.close()
        finally:
            servers.cleanup()


def _maps_nodes(page):
    """Ids of the drawn layers whose architecture entry says maps can be shown."""
    return page.evaluate("""url => fetch(url).then(r => r.json()).then(a =>
        a.nodes.filter(n => n.has_maps && !n.is_model &&
                            document.querySelector('.node[data-node="' + n.id + '"]')).map(n => n.id))""",
                         page.locator("#explorer").evaluate("e => JSON.parse(e.dataset.urls).architecture"))


def _register(context, servers):
    """Creates the benchmark's user, which logs the browser context in."""
    form = context.request.get(servers.url + "/auth/register").text()
    password = "bench-password-1"
    context.request.post(servers.url + "/auth/register", form={
        "csrf_token": CSRF_PATTERN.search(form).group(1), "username": "bench_explore",
        "password": password, "confirm": password})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures-only", action="store_true",
                        help="only the 150-layer graph (no servers, no job)")
    arguments = parser.parse_args()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            architecture_drawing(browser)
            if not arguments.fixtures_only:
                demo_exploration(browser)
        finally:
            browser.close()


if __name__ == "__main__":
    main()
