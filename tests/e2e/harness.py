"""The end-to-end harness: the real servers, a user over HTTP, waiting, screenshots.

``Servers`` starts the README's start command (``bash scripts/start.sh``) on
free ports with a fresh storage folder and database under a temporary folder,
and waits until Flask and the Bokeh server both answer. ``WebUser`` is one
logged-in user over HTTP (Playwright's request context, so cookies and CSRF
tokens behave as in a browser). Screenshots go to ``test-artifacts/e2e/``.
"""
import io
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts" / "e2e"
SHARED_DEMO_DIR = REPO_ROOT / "test-artifacts" / "demo"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30
ENDED_STATES = ("finished", "failed", "stopped")
# Settings the servers must not inherit from the shell that runs the tests.
INHERITED_SETTINGS = ("VISUALIZER_SECRET_KEY", "VISUALIZER_DATABASE_URL", "VISUALIZER_BOKEH_URL",
                      "VISUALIZER_RUN_MEMORY_MB", "VISUALIZER_RUN_WALL_TIME_S", "VISUALIZER_HTTPS",
                      "VISUALIZER_USER_MAX_SCRIPTS", "VISUALIZER_USER_STORAGE_MB",
                      "VISUALIZER_RUN_DISK_MB", "VISUALIZER_RUN_PROCESSES",
                      "VISUALIZER_RUN_NETWORK", "VISUALIZER_SANDBOX", "VISUALIZER_RUNNER",
                      "VISUALIZER_RAY_ADDRESS", "VISUALIZER_RUN_CPUS", "VISUALIZER_RUN_GPUS",
                      "VISUALIZER_EXPLORE_IDLE_S", "VISUALIZER_EXPLORE_MODEL_MB",
                      "VISUALIZER_DEMO_DIR",
                      # Ray's client prefers these to the address it is given.
                      "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
CSRF_PATTERN = re.compile(r'name="csrf_token" value="([^"]+)"')


def free_port():
    """A TCP port that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout, interval=0.2, what="condition"):
    """Calls ``condition()`` until it returns something truthy; returns that value.

    Args:
        condition: callable without arguments.
        timeout: seconds before giving up with an AssertionError naming ``what``.
        interval: seconds between calls.
        what: words for the failure message, or a callable that returns them
            (called only on failure, e.g. to show the server log at that time).
    """
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError("timed out after %g s waiting for %s"
                                 % (timeout, what() if callable(what) else what))
        time.sleep(interval)


class Servers:
    """The visualizer (Flask + Bokeh) started with ``bash scripts/start.sh``.

    Args:
        root: a fresh folder; ``storage/``, ``instance/`` and ``server.log`` go inside.
        **settings: extra environment variables, e.g. ``VISUALIZER_MAX_RUNS="2"``
            (``VISUALIZER_STORAGE`` moves the storage folder out of ``root``).

    The ports, storage folder and database stay the same across ``start`` calls,
    so a restarted server finds its database again.
    """

    def __init__(self, root, **settings):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage_dir = Path(settings.get("VISUALIZER_STORAGE", self.root / "storage"))
        self.instance_dir = self.root / "instance"
        self.log_path = self.root / "server.log"
        self.port, self.bokeh_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if k not in INHERITED_SETTINGS}
        env.update(VISUALIZER_HOST="127.0.0.1", VISUALIZER_PORT=str(self.port),
                   VISUALIZER_BOKEH_PORT=str(self.bokeh_port),
                   VISUALIZER_STORAGE=str(self.storage_dir),
                   VISUALIZER_INSTANCE=str(self.instance_dir), TF_CPP_MIN_LOG_LEVEL="2",
                   # one demo model for every test server: set-up trains it once, not per server
                   VISUALIZER_DEMO_DIR=str(SHARED_DEMO_DIR))
        env.update(settings)
        self.env = env
        self.process = None

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    @property
    def bokeh_url(self):
        return "http://127.0.0.1:%d" % self.bokeh_port

    @property
    def pid(self):
        """The pid of ``python -m visualizer`` (start.sh ``exec``s it)."""
        return self.process.pid

    def start(self, preexec_fn=None):
        """Starts the servers and waits until both ports answer.

        Args:
            preexec_fn: optional callable run in the child before ``exec``
                (e.g. to set a resource limit).
        """
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(["bash", "scripts/start.sh"], cwd=REPO_ROOT, env=self.env,
                                        stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=preexec_fn)
        log.close()
        try:
            wait_for(self._answering, START_TIMEOUT_S, interval=0.3,
                     what="the servers to answer on ports %d and %d" % (self.port, self.bokeh_port))
        except BaseException:  # a fixture that fails before its yield gets no teardown
            self.cleanup()
            raise
        return self

    def _answering(self):
        if self.process.poll() is not None:
            raise AssertionError("the start command exited with code %s:\n%s"
                                 % (self.process.returncode, self.log_tail()))
        try:
            with urllib.request.urlopen(self.url + "/auth/login", timeout=2) as response:
                if response.status != 200:
                    return False
            socket.create_connection(("127.0.0.1", self.bokeh_port), timeout=2).close()
            return True
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, sig=signal.SIGTERM):
        """Sends ``sig`` to the server process only and waits for it to end."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, sig)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def bokeh_pids(self):
        """Pids of Bokeh servers listening on this instance's Bokeh port (orphans included)."""
        pids = []
        for pid in _pids():
            command = _cmdline(pid)
            if "custom_bokeh" in command and str(self.bokeh_port) in command:
                pids.append(pid)
        return pids

    def run_pids(self):
        """{pid: run folder} of every run process (wrapper and script) of this instance."""
        prefix = ("VISUALIZER_RUN_DIR=%s/" % self.storage_dir).encode()
        found = {}
        for pid in _pids():
            try:
                with open("/proc/%d/environ" % pid, "rb") as f:
                    entries = f.read().split(b"\0")
            except OSError:
                continue
            for entry in entries:
                if entry.startswith(prefix):
                    found[pid] = entry.split(b"=", 1)[1].decode()
        return found

    def alive(self):
        """Whether the Flask server and its Bokeh server are both running."""
        return (self.process is not None and self.process.poll() is None
                and bool(self.bokeh_pids()))

    def rss_kb(self):
        """Resident memory of the server process (``VmRSS`` in /proc/<pid>/status), in kB."""
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS for pid %d" % self.pid)

    def secret_key(self):
        return (self.instance_dir / "secret_key").read_text().strip()

    def log_tail(self, chars=4000):
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def cleanup(self):
        """Stops the servers and anything a test left behind (runs, an orphaned Bokeh server)."""
        self.stop()
        for pid in list(self.run_pids()) + self.bokeh_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _pids():
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class WebUser:
    """One user of the web app over HTTP, with its own cookies.

    Args:
        playwright: the Playwright object.
        servers: the ``Servers`` to talk to.
        username: 5 to 20 letters, digits or underscores.
        password: at least 8 characters.
    """

    def __init__(self, playwright, servers, username, password="e2e-password-1"):
        self.servers = servers
        self.username = username
        self.password = password
        self.request = playwright.request.new_context(base_url=servers.url)

    def get(self, path, **kwargs):
        return self.request.get(path, max_redirects=0, **kwargs)

    def post(self, path, **kwargs):
        return self.request.post(path, max_redirects=0, **kwargs)

    def csrf_token(self, page="/upload"):
        """The CSRF token of this user's session, read from a form page."""
        response = self.request.get(page)
        match = CSRF_PATTERN.search(response.text())
        assert match, "no csrf_token on %s (HTTP %d)" % (page, response.status)
        return match.group(1)

    def register_and_login(self):
        token = self.csrf_token("/auth/register")
        response = self.post("/auth/register", form={
            "csrf_token": token, "username": self.username, "password": self.password,
            "confirm": self.password})
        assert response.status == 302, response.text()
        response = self.post("/auth/login", form={
            "csrf_token": self.csrf_token("/auth/login"), "username": self.username,
            "password": self.password})
        assert response.status == 302 and "/auth/login" not in response.headers["location"]
        return self

    def upload(self, filename, source, tags=""):
        """Uploads a script; returns the response (302 to the overview when accepted)."""
        data = source.encode("utf-8") if isinstance(source, str) else source
        return self.post("/upload", multipart={
            "csrf_token": self.csrf_token(), "tags": tags,
            "file": {"name": filename, "mimeType": "text/x-python", "buffer": data}})

    def upload_script(self, filename, source, tags=""):
        """Uploads a script that must be accepted; returns its id."""
        response = self.upload(filename, source, tags)
        assert response.status == 302, "upload of %s: HTTP %d\n%s" % (
            filename, response.status, response.text()[:2000])
        return int(re.search(r"/scripts/(\d+)$", response.headers["location"]).group(1))

    def run(self, script_id, image=None):
        """Starts a run; ``image`` is (file name, bytes), or None for no image."""
        form = {"csrf_token": self.csrf_token("/scripts/%d" % script_id),
                "images": "new" if image else "none"}
        if image:
            form["image"] = {"name": image[0], "mimeType": "image/png", "buffer": image[1]}
        response = self.post("/scripts/%d/run" % script_id, multipart=form)
        assert response.status == 302, response.text()[:2000]
        return response

    def status(self, script_id):
        response = self.get("/scripts/%d/status.json" % script_id)
        assert response.status == 200, response.status
        return response.json()

    def wait_for_state(self, script_id, states, timeout):
        """Waits until the script's last run is in one of ``states``; returns the status."""
        states = (states,) if isinstance(states, str) else tuple(states)
        return wait_for(lambda: (lambda s: s if s["state"] in states else None)(
            self.status(script_id)), timeout, interval=0.3,
            what=lambda: "script %d to reach %s (server log:\n%s)" % (
                script_id, "/".join(states), self.servers.log_tail(1500)))

    def run_dir(self, script_id, stem):
        """The run folder of one of this user's scripts, found in the storage folder."""
        folders = [p for p in self.servers.storage_dir.glob("*/%s" % stem) if p.is_dir()]
        assert len(folders) == 1, folders
        return folders[0]


# What the page's Bokeh documents hold: the longest "progress" column (the batch
# curve), image columns, every text (Divs: the snapshot label and messages), and
# the snapshot sliders. Read from BokehJS models, so it does not depend on how
# the canvas is drawn.
BOKEH_STATE_JS = """() => {
  const state = {documents: 0, progress: -1, images: 0, texts: [], slider_ends: []};
  const docs = (window.Bokeh && window.Bokeh.documents) || [];
  state.documents = docs.length;
  for (const doc of docs) {
    for (const model of doc.all_models) {
      if (typeof model.get_column === "function") {
        const columns = model.columns();
        if (columns.includes("progress")) {
          state.progress = Math.max(state.progress, model.get_length() || 0);
        }
        if (columns.includes("image") && (model.get_length() || 0) > 0) { state.images += 1; }
      }
      if (typeof model.text === "string" && model.text) { state.texts.push(model.text); }
      if (model.type === "Slider") {
        state.slider_ends.push(model.end);
      }
    }
  }
  return state;
}"""


def bokeh_state(page):
    """What the Bokeh documents of ``page`` hold (see BOKEH_STATE_JS)."""
    return page.evaluate(BOKEH_STATE_JS)


def read_status_file(run_dir):
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def screenshot(page, name):
    """Saves a full-page screenshot as ``test-artifacts/e2e/<name>.png``."""
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS_DIR / ("%s.png" % name)), full_page=True)


FAKE_TRAINING = '''"""Fake training: writes the run-folder format as the callbacks do, no keras."""
import os
import time

import numpy as np

from custom_keras import storage

run_dir = storage.resolve_run_dir(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(run_dir, "script.pid"), "w") as f:
    f.write(str(os.getpid()))
os.makedirs(storage.networks_dir(run_dir), exist_ok=True)
with open(os.path.join(storage.networks_dir(run_dir), "{stem}.keras"), "wb") as f:
    f.write(b"network of {stem}")
digit = np.zeros((28, 28, 1), np.uint8)
digit[6:22, 12:16] = 255
storage.write_input_images(run_dir, {{"digit.png": digit}})
for stage in range({snapshots}):
    storage.append_row(storage.results_path(run_dir, "training_progress.tsv"),
                       ["progress", "epoch", "batch", "accuracy", "loss"],
                       [stage / 10, 0, stage, stage / 10, 1.0 / (stage + 1)])
    storage.write_snapshot(run_dir, "saliency_maps.pickle",
                           {{"digit.png": np.full((28, 28, 1), 20 * stage % 256, np.uint8)}},
                           "digit.png",
                           {{"stage": stage, "epoch": 0, "batch": stage, "step": stage}},
                           {{"digit.png": {{"predicted_class": 1, "confidence": 0.5}}}})
    print("snapshot", stage, flush=True)
    time.sleep({interval_s})
print("done", flush=True)
'''


def fake_training(stem, snapshots=3, interval_s=0.0):
    """Source of a script that writes ``snapshots`` training-progress rows and saliency
    snapshots (stage 0, 1, ...) ``interval_s`` apart, a fake network file and its pid
    into ``script.pid``; quick to start because it imports no keras."""
    return FAKE_TRAINING.format(stem=stem, snapshots=snapshots, interval_s=interval_s)


def png_bytes(size=(28, 28), mode="L", color=128):
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def files_under(folder):
    """Every file path under ``folder``, relative, as a set (to compare before and after)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def process_alive(pid):
    """Whether ``pid`` is a live process (a zombie counts as ended)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def record_measurement(name, value):
    """Adds ``name: value`` to ``test-artifacts/e2e/measurements.json`` for the report."""
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS_DIR / "measurements.json"
    try:
        measurements = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        measurements = {}
    measurements[name] = value
    path.write_text(json.dumps(measurements, indent=2, sort_keys=True))


def host_pid(run_dir, sandbox_pid):
    """The pid on this machine of the run's process that is ``sandbox_pid`` inside its
    sandbox (a sandboxed script sees the pids of its own PID namespace), or None."""
    entry = ("VISUALIZER_RUN_DIR=%s" % run_dir).encode()
    for pid in _pids():
        try:
            with open("/proc/%d/environ" % pid, "rb") as f:
                if entry not in f.read().split(b"\0"):
                    continue
            with open("/proc/%d/status" % pid) as f:
                nspids = [line.split()[1:] for line in f if line.startswith("NSpid:")][0]
        except (OSError, IndexError):
            continue
        if len(nspids) > 1 and int(nspids[-1]) == sandbox_pid:
            return pid
    return None
