"""``python -m visualizer``, the one start command, as a real process on free ports."""
import http.client
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from urllib.parse import urlsplit

import pytest

from test_runner import run_processes
from visualizer import config

START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 60


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server_env(tmp_path):
    """Environment for a visualizer on fresh storage, instance folder and free ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISUALIZER_")}
    env.update(VISUALIZER_HOST="127.0.0.1", VISUALIZER_PORT=str(free_port()),
               VISUALIZER_BOKEH_PORT=str(free_port()),
               VISUALIZER_STORAGE=str(tmp_path / "storage"),
               VISUALIZER_INSTANCE=str(tmp_path / "instance"),
               TF_CPP_MIN_LOG_LEVEL="2")
    return env


class Visualizer:
    """``python -m visualizer`` started in the background, its output in a file."""

    def __init__(self, env, log_path, as_background_job=False):
        self.env, self.log_path = env, log_path
        # A shell starts a background job (`... &`) with SIGINT ignored.
        ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if as_background_job else None
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "visualizer"], env=env,
                                            cwd=config.REPO_ROOT, stdout=log,
                                            stderr=subprocess.STDOUT, preexec_fn=ignore_sigint)

    def log(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_until_serving(self):
        deadline = time.time() + START_TIMEOUT_S
        while "open http://" not in self.log():
            if self.process.poll() is not None or time.time() > deadline:
                pytest.fail("the visualizer did not start:\n" + self.log())
            time.sleep(0.2)

    def get(self, port, path):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.getheader("Location"), response.read()
        finally:
            connection.close()

    def interrupt(self, sig=signal.SIGINT):
        """Ctrl-C (or ``sig``) to the server process only; returns the exit code."""
        self.process.send_signal(sig)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail("the visualizer did not stop on %s:\n%s" % (sig.name, self.log()))

    def stop(self):
        """Ctrl-C, and SIGKILL if that does not end it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def start_visualizer(tmp_path):
    started = []

    def start(env, as_background_job=False):
        started.append(Visualizer(env, tmp_path / ("server%d.log" % len(started)),
                                  as_background_job))
        return started[-1]
    yield start
    for visualizer in started:
        visualizer.stop()
        kill_leftover_runs(visualizer.env["VISUALIZER_STORAGE"])


def kill_leftover_runs(storage_dir):
    """SIGKILLs run processes of ``storage_dir``, which a killed server (or failed test) leaves."""
    prefix = ("VISUALIZER_RUN_DIR=%s/" % storage_dir).encode()
    for name in os.listdir("/proc"):
        try:
            with open("/proc/%s/environ" % name, "rb") as f:
                if any(e.startswith(prefix) for e in f.read().split(b"\0")):
                    os.kill(int(name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def descendants(pid):
    """Pids of the live processes below ``pid`` (runs have their own sessions, but stay children)."""
    parents = {}
    for name in os.listdir("/proc"):
        fields = _stat_fields(name) if name.isdigit() else None
        if fields and fields[0] not in ("Z", "X"):
            parents[int(name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def process_running(pid):
    fields = _stat_fields(str(pid))
    return fields is not None and fields[0] not in ("Z", "X")


def _stat_fields(pid):
    """State, parent pid, ... of /proc/<pid>/stat, or None if it is gone."""
    try:
        with open("/proc/%s/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def test_start_command_serves_flask_and_bokeh_and_stops_both_on_ctrl_c(server_env,
                                                                       start_visualizer):
    visualizer = start_visualizer(server_env)
    visualizer.wait_until_serving()
    flask_port, bokeh_port = int(server_env["VISUALIZER_PORT"]), int(server_env["VISUALIZER_BOKEH_PORT"])

    status, location, _ = visualizer.get(flask_port, "/")
    assert status == 302 and "login" in location
    status, _, body = visualizer.get(flask_port, urlsplit(location).path)
    assert status == 200 and b"<form" in body and b"password" in body
    # The Bokeh server answers; without a session token signed by the app it opens nothing.
    status, _, _ = visualizer.get(bokeh_port, "/training_progress")
    assert status == 403
    instance = server_env["VISUALIZER_INSTANCE"]
    assert os.path.exists(os.path.join(instance, config.DATABASE_FILE))
    assert os.stat(os.path.join(instance, config.SECRET_KEY_FILE)).st_mode & 0o777 == 0o600
    children = descendants(visualizer.process.pid)
    assert children  # the Bokeh server

    assert visualizer.interrupt() == 0
    assert not [pid for pid in children if process_running(pid)]
    assert "Training visualizer stopped." in visualizer.log()


@pytest.mark.parametrize("sig, as_background_job", [
    (signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["ctrl_c", "sigterm", "sigint_to_background_job"])
def test_stopping_the_server_stops_running_runs_and_records_it(server_env, start_visualizer,
                                                               sig, as_background_job):
    run_dir = seed_queued_run(server_env, """
        import subprocess, time
        child = subprocess.Popen(["sleep", "600"])
        with open("child.pid", "w") as f:
            f.write(str(child.pid))
        time.sleep(600)
    """)
    visualizer = start_visualizer(server_env, as_background_job)
    visualizer.wait_until_serving()
    # At start-up the queued run is reconciled, queued again and started.
    child_pid_file = os.path.join(run_dir, "child.pid")
    deadline = time.time() + START_TIMEOUT_S
    while not (os.path.exists(child_pid_file) and open(child_pid_file).read()
               and read_run(server_env)[0] == "running"):
        assert time.time() < deadline, "the queued run did not start:\n" + visualizer.log()
        time.sleep(0.1)
    run_pid = read_run(server_env)[1]
    children = descendants(visualizer.process.pid)
    assert run_pid in children
    assert run_processes(run_dir)  # the wrapper, the sandbox, the script and its child

    assert visualizer.interrupt(sig) == 0
    assert not [pid for pid in children if process_running(pid)]
    assert run_processes(run_dir) == []
    assert read_run(server_env) == ("stopped", None, "stopped because the server shut down")


def test_killed_visualizer_leaves_no_bokeh_server_behind(server_env, start_visualizer):
    visualizer = start_visualizer(server_env)
    visualizer.wait_until_serving()
    children = descendants(visualizer.process.pid)
    assert children

    visualizer.process.kill()
    visualizer.process.wait()

    deadline = time.time() + STOP_TIMEOUT_S
    while [pid for pid in children if process_running(pid)]:
        assert time.time() < deadline, "the Bokeh server outlived its killed parent"
        time.sleep(0.1)


def test_taken_port_is_reported_and_exits_non_zero(server_env, start_visualizer):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(server_env["VISUALIZER_BOKEH_PORT"])))
        taken.listen()
        visualizer = start_visualizer(server_env)
        exit_code = visualizer.process.wait(STOP_TIMEOUT_S)

    assert exit_code != 0
    assert ("port %s on 127.0.0.1 is already in use" % server_env["VISUALIZER_BOKEH_PORT"]
            in visualizer.log())
    assert "VISUALIZER_BOKEH_PORT" in visualizer.log()


def test_bad_setting_is_reported_and_exits_non_zero(server_env, start_visualizer):
    visualizer = start_visualizer(dict(server_env, VISUALIZER_PORT="five thousand"))

    assert visualizer.process.wait(STOP_TIMEOUT_S) != 0
    assert "VISUALIZER_PORT" in visualizer.log()


def seed_queued_run(env, code):
    """A user, a script and a queued run of it in the database the server will use.

    Returns the run folder.
    """
    from visualizer import create_app
    from visualizer.run_store import run_folder, run_script_path
    from visualizer.models import Run, Script, User, db

    class NoRunner:  # the test process must not run anything itself
        def reconcile(self, records):
            return []

    app = create_app({"STORAGE_DIR": env["VISUALIZER_STORAGE"],
                      "INSTANCE_DIR": env["VISUALIZER_INSTANCE"], "RUNNER": NoRunner()})
    with app.app_context():
        user = User(username="ada")
        user.set_password("a long password")
        script = Script(user=user, filename="train.py")
        run = Run(script=script, state="queued", number=1)
        db.session.add_all([user, script, run])
        db.session.commit()
        folder = run_folder(app, run)
        os.makedirs(folder)
        with open(run_script_path(app, run), "w") as f:
            f.write(textwrap.dedent(code))
    return folder


def read_run(env):
    """(state, pid, message) of the only run, read straight from the database file."""
    path = os.path.join(env["VISUALIZER_INSTANCE"], config.DATABASE_FILE)
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT state, pid, message FROM run").fetchone()
