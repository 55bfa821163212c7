"""Benchmark: what a hostile run folder costs the servers (issue 10, part 2).

The attacks that once hung pages for 12-30 s and grew the Bokeh server by gigabytes,
against a clean run folder of the same techniques:

- Bokeh server (``python -m custom_bokeh`` on a free port): sessions are opened the
  way an embedded page opens them (GET ``autoload.js`` with a signed token builds the
  document on the server). The hostile run has a 5000x5000 saliency result (25 MB:
  under the read cap, over the drawing cap; the issue's 6000x6000 is over the read
  cap and not read at all) opened in three tabs, ``/dev/zero`` links as input images, training table and a snapshot,
  and a named pipe as a history index. Printed: the time of each session and the
  growth of the server's peak memory (VmHWM), hostile against clean.
- Flask app (test client): the output tab, the output download and the image route
  with a named pipe or a ``/dev/zero`` link, against the same routes on plain files.

Run with ``.venv/bin/python -m benchmarks.hostile_run_folder``.
"""
import io
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np

from custom_bokeh import auth
from custom_keras import storage

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_START_TIMEOUT_S = 60
SESSION_TIMEOUT_S = 120
TAG = {"stage": 0, "epoch": 0, "batch": 0, "step": 0}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def memory_mb(pid, field):
    """The process's resident memory now ("VmRSS") or at its peak ("VmHWM"), in MB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no %s for pid %d" % (field, pid))


def write_run(run, hostile):
    """A run folder with every technique's files; hostile ones where ``hostile``."""
    size = 5000 if hostile else 28
    storage.write_snapshot(run, "saliency_maps.pickle",
                           {"digit.png": np.zeros((size, size, 1), np.uint8)}, "digit.png", TAG)
    storage.write_snapshot(run, "deconvolutional_network.pickle",
                           {"digit.png": [(np.zeros((28, 28, 1), np.uint8), "conv2d", 0)]},
                           "digit.png", TAG)
    storage.write_snapshot(run, "layer_activations.pickle",
                           {"digit.png": [("Layer 1: conv2d", np.zeros((32, 26, 26), np.uint8))]},
                           "digit.png", TAG)
    storage.write_input_images(run, {"digit.png": np.zeros((28, 28, 1), np.uint8)})
    storage.append_rows(storage.results_path(run, "training_progress.tsv"),
                        ["progress", "epoch", "batch", "loss"], [[0.1, 0, 1, 0.5]])
    if not hostile:
        return
    replace_with(storage.results_path(run, storage.INPUT_IMAGES_FILE), "/dev/zero")
    replace_with(storage.results_path(run, "training_progress.tsv"), "/dev/zero")
    history = storage.history_dir(run, "deconvolutional_network.pickle")
    replace_with(os.path.join(history, "000000000.pickle"), "/dev/zero")
    index = os.path.join(storage.history_dir(run, "layer_activations.pickle"),
                         storage.HISTORY_INDEX)
    os.remove(index)
    os.mkfifo(index)


def replace_with(path, link_target):
    os.remove(path)
    os.symlink(link_target, path)


def open_session(url, secret, app, run_rel_dir):
    """Seconds to open one dashboard session, as an embedded page does; and the status."""
    user_id = int(run_rel_dir.split("/")[0])
    token = auth.make_token(secret, user_id, run_rel_dir, app)
    request = urllib.request.Request(
        "%s/%s/autoload.js?bokeh-autoload-element=x&bokeh-absolute-url=%s/%s" % (
            url, app, url, app), headers={"Bokeh-Session-Id": token})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=SESSION_TIMEOUT_S) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    return time.perf_counter() - start, status


def bokeh_server(storage_dir, secret):
    port = free_port()
    env = dict(os.environ, VISUALIZER_SECRET_KEY=secret)
    process = subprocess.Popen(
        [sys.executable, "-m", "custom_bokeh", "--port", str(port), "--storage-dir", storage_dir],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + SERVER_START_TIMEOUT_S
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, "http://127.0.0.1:%d" % port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the Bokeh server did not start")


WARM_UP = storage.run_rel_dir(1, "warm_up.py", 1)
SESSIONS = (["saliency_maps"] * 3
            + ["deconvolutional_network", "layer_activations", "training_progress"])


def measure_bokeh(storage_dir, hostile):
    """(peak and kept memory growth in MB, seconds of the slowest session) for one kind of run."""
    secret = secrets.token_urlsafe(32)
    run_rel_dir = storage.run_rel_dir(1, "hostile.py" if hostile else "clean.py", 1)
    write_run(os.path.join(storage_dir, run_rel_dir), hostile)
    process, url = bokeh_server(storage_dir, secret)
    try:
        open_session(url, secret, "saliency_maps", WARM_UP)  # imports, first document
        peak, resident = memory_mb(process.pid, "VmHWM"), memory_mb(process.pid, "VmRSS")
        times = []
        for app in SESSIONS:
            seconds, status = open_session(url, secret, app, run_rel_dir)
            assert status == 200, (app, status)
            times.append(seconds)
        return (memory_mb(process.pid, "VmHWM") - peak,
                memory_mb(process.pid, "VmRSS") - resident, max(times))
    finally:
        process.terminate()
        process.wait(timeout=15)


class NoRunner:
    def start(self, *args, **kwargs):
        pass

    def stop(self, run_id):
        pass

    def reconcile(self, records):
        return []


def measure_flask(tmp):
    """{route: (seconds on a plain file, seconds on a pipe or /dev/zero link)}."""
    from visualizer import create_app
    app = create_app({"TESTING": True, "SECRET_KEY": "benchmark", "WTF_CSRF_ENABLED": False,
                      "INSTANCE_DIR": os.path.join(tmp, "instance"),
                      "STORAGE_DIR": os.path.join(tmp, "flask_storage"),
                      "SQLALCHEMY_DATABASE_URI": "sqlite:///" + os.path.join(tmp, "db.sqlite"),
                      "RUNNER": NoRunner()})
    client = app.test_client()
    client.post("/auth/register", data={"username": "mallory", "password": "password123",
                                        "confirm": "password123"})
    client.post("/auth/login", data={"username": "mallory", "password": "password123"})
    client.post("/upload", data={"file": (io.BytesIO(b"print(1)\n"), "mnist.py"), "tags": ""},
                content_type="multipart/form-data")
    client.post("/scripts/1/run", data={"images": "none"})  # run 1: its folder, no process
    run = storage.run_dir_in(app.config["STORAGE_DIR"], storage.run_rel_dir(1, "mnist.py", 1))
    routes = {"output tab": ("output.txt", "/scripts/1/output.json", "pipe"),
              "output download": ("output.txt", "/scripts/1/output/download", "pipe"),
              "image": ("images/d.png", "/scripts/1/images/d.png", "/dev/zero")}
    found = {}
    for name, (rel_path, url, trick) in routes.items():
        path = os.path.join(run, rel_path)
        with open(path, "wb") as f:
            f.write(b"line\n" * 100)
        plain = timed(client, url)
        os.remove(path)
        os.mkfifo(path) if trick == "pipe" else os.symlink(trick, path)
        found[name] = (plain, timed(client, url))
        os.remove(path)
    return found


def timed(client, url):
    start = time.perf_counter()
    response = client.get(url)
    response.get_data()
    return time.perf_counter() - start


def main():
    tmp = tempfile.mkdtemp(prefix="hostile-benchmark-")
    try:
        storage_dir = os.path.join(tmp, "storage")
        os.makedirs(storage.run_dir_in(storage_dir, WARM_UP))
        clean_peak, clean_kept, clean_s = measure_bokeh(storage_dir, hostile=False)
        hostile_peak, hostile_kept, hostile_s = measure_bokeh(storage_dir, hostile=True)
        print("Bokeh server, %d sessions (%s):" % (len(SESSIONS), ", ".join(SESSIONS)))
        print("  peak memory growth: clean %.1f MB, hostile %.1f MB (a 25 MB result read, "
              "read cap %s)" % (clean_peak, hostile_peak,
                                storage.format_bytes(storage.MAX_RESULT_BYTES)))
        print("  memory kept after the sessions: clean %.1f MB, hostile %.1f MB"
              % (clean_kept, hostile_kept))
        print("  slowest session: clean %.3f s, hostile %.3f s (ratio %.2f)"
              % (clean_s, hostile_s, hostile_s / clean_s))
        print("Flask routes, plain file against a named pipe or a /dev/zero link:")
        for name, (plain, hostile) in measure_flask(tmp).items():
            print("  %-16s plain %.4f s, hostile %.4f s (ratio %.2f)"
                  % (name, plain, hostile, hostile / plain))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
