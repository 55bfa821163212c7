"""The runner contract: what every runner (``LocalRunner``, ``RayRunner``) does, tested alike.

Each test runs once per runner, with real sandboxed scripts (tiny Python files, no
TensorFlow). The Ray half (marked ``ray``) runs on a local Ray head that the
``ray_head`` fixture starts with token authentication and stops afterwards.
"""
import os
import textwrap
import time
import uuid

import psutil
import pytest

from custom_keras import storage
from visualizer.ray_runner import RayRunner
from visualizer.runner import LocalRunner
from visualizer.sandbox import Cgroups, Sandbox

TIMEOUT_S = 120
RUNNERS = ["local", pytest.param("ray", marks=pytest.mark.ray)]
# A server secret that must never reach a script (the Ray token is another).
SERVER_SECRET = "server-secret-" + uuid.uuid4().hex


@pytest.fixture(params=RUNNERS)
def make_runner(request, tmp_path, monkeypatch):
    """``make_runner(**limits)``: a new runner of the parametrised kind over one storage folder
    (a second call is the same installation after a server restart)."""
    monkeypatch.setenv("VISUALIZER_TEST_SERVER_SECRET", SERVER_SECRET)
    storage_dir = str(tmp_path / "storage")
    os.makedirs(storage_dir)
    made = []

    def make(**limits):
        sandbox = Sandbox(storage_dir)
        if request.param == "local":
            runner = LocalRunner(max_concurrent=2, grace_period_s=1, sandbox=sandbox,
                                 cgroups=Cgroups.detect(storage_dir), **limits)
        else:
            head = request.getfixturevalue("ray_head")
            for name, value in head.client_env.items():
                monkeypatch.setenv(name, value)
            runner = RayRunner(head.address, storage_dir, num_cpus=1, sandbox=sandbox, **limits)
        made.append(runner)
        return runner

    make.storage_dir = storage_dir
    make.kind = request.param
    yield make
    for runner in made:
        runner.shutdown(stop_runs=True)


class Runs:
    """Polls a runner and keeps the latest update of each run."""

    def __init__(self, runner, storage_dir):
        self.runner = runner
        self.storage_dir = storage_dir
        self.latest = {}

    def start(self, run_id, code):
        """Writes ``code`` as the script of a new run folder and starts it; returns the folder."""
        run_dir = os.path.join(self.storage_dir, "run-%d" % run_id)
        os.makedirs(run_dir)
        with open(os.path.join(run_dir, "script.py"), "w") as f:
            f.write(textwrap.dedent(code))
        self.runner.start(run_id, run_dir, "script.py")
        return run_dir

    def poll(self):
        for update in self.runner.poll():
            self.latest[update.run_id] = update

    def state(self, run_id):
        update = self.latest.get(run_id)
        return update.state if update else None

    def wait_for(self, run_id, *states):
        wait_until(lambda: self.poll() or self.state(run_id) in states,
                   "run %s to be %s (it is %s)" % (run_id, " or ".join(states),
                                                   self.state(run_id)))
        return self.latest[run_id]


def wait_until(condition, what):
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail("gave up waiting for " + what)


def output_of(run_dir):
    try:
        with open(storage.output_path(run_dir), errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def processes_named(marker):
    return [p for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])]


WAIT_FOR_GO = """
    import os, time
    print("ready", flush=True)
    while not os.path.exists("go"):
        time.sleep(0.05)
    print("done", flush=True)
"""


def test_a_script_runs_and_its_output_and_outcome_land_in_the_run_folder(make_runner):
    runs = Runs(make_runner(), make_runner.storage_dir)
    run_dir = runs.start(1, 'print("line one")\nprint("line two")\n')
    ended = runs.wait_for(1, "finished", "failed", "stopped")
    assert (ended.state, ended.exit_code, ended.message) == ("finished", 0, None), ended
    assert output_of(run_dir) == "line one\nline two\n"
    assert storage.read_run_status(run_dir)["state"] == "finished"


@pytest.mark.parametrize("code, exit_code, message", [
    ("import sys; sys.exit(3)", 3, "exited with code 3"),
    ("raise ValueError('broken script')", 1, "exited with code 1"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -9, "killed by signal SIGKILL"),
])
def test_a_failing_script_ends_failed_with_its_exit_code(make_runner, code, exit_code, message):
    runs = Runs(make_runner(), make_runner.storage_dir)
    run_dir = runs.start(1, code)
    ended = runs.wait_for(1, "finished", "failed", "stopped")
    assert (ended.state, ended.exit_code, ended.message) == ("failed", exit_code, message)
    if exit_code == 1:
        assert "ValueError: broken script" in output_of(run_dir)


def test_stop_ends_a_script_and_every_process_it_started(make_runner):
    marker = "contract-child-" + uuid.uuid4().hex
    runs = Runs(make_runner(), make_runner.storage_dir)
    run_dir = runs.start(1, """
        import os, subprocess, sys, time
        sleeper = [sys.executable, "-c", "import time; time.sleep(600)", %r]
        subprocess.Popen(sleeper)
        subprocess.Popen(sleeper, start_new_session=True)  # escaped from the process group
        print("ready", flush=True)
        time.sleep(600)
    """ % marker)
    wait_until(lambda: "ready" in output_of(run_dir) and len(processes_named(marker)) == 2,
               "the script and its two children")
    runs.runner.stop(1)
    ended = runs.wait_for(1, "finished", "failed", "stopped")
    assert (ended.state, ended.message) == ("stopped", "stopped by the user")
    wait_until(lambda: not processes_named(marker), "the children to be gone")


def test_a_run_over_the_memory_limit_ends_failed_naming_the_limit(make_runner):
    runs = Runs(make_runner(memory_limit_mb=100), make_runner.storage_dir)
    runs.start(1, """
        block = bytearray(400 * 2 ** 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
    """)
    ended = runs.wait_for(1, "finished", "failed", "stopped")
    assert ended.state == "failed"
    assert ended.message.startswith("memory limit of 100 MB exceeded"), ended.message


def test_a_run_over_the_wall_time_limit_ends_failed_naming_the_limit(make_runner):
    runs = Runs(make_runner(wall_time_s=2), make_runner.storage_dir)
    runs.start(1, "import time; time.sleep(600)")
    ended = runs.wait_for(1, "finished", "failed", "stopped")
    assert (ended.state, ended.message) == ("failed", "wall time limit of 2 s exceeded")


def test_a_restarted_server_takes_over_a_running_run_and_sees_it_end(make_runner):
    runs = Runs(make_runner(), make_runner.storage_dir)
    run_dir = runs.start(7, WAIT_FOR_GO)
    running = runs.wait_for(7, "running")
    wait_until(lambda: "ready" in output_of(run_dir), "the script to start")
    runs.runner.shutdown(stop_runs=False)  # the server goes down, the run goes on

    restarted = Runs(make_runner(), make_runner.storage_dir)
    [taken_over] = restarted.runner.reconcile([(7, "running", running.pid, run_dir, "script.py")])
    assert taken_over.state == "running"
    open(os.path.join(run_dir, "go"), "w").close()
    ended = restarted.wait_for(7, "finished", "failed", "stopped")
    assert (ended.state, ended.exit_code) == ("finished", 0)
    assert output_of(run_dir) == "ready\ndone\n"


def test_runs_beyond_the_concurrency_limit_wait_queued_until_a_slot_is_free(make_runner):
    runs = Runs(make_runner(), make_runner.storage_dir)  # 2 at once: 2 slots, or 2 CPUs of Ray
    run_dirs = {run_id: runs.start(run_id, WAIT_FOR_GO) for run_id in (1, 2, 3)}
    never_run = runs.start(4, 'open("ran", "w")')
    wait_until(lambda: runs.poll() or [runs.state(i) for i in (1, 2)] == ["running"] * 2,
               "the first two runs to run")
    for _ in range(10):
        runs.poll()
        assert (runs.state(3), runs.state(4)) == ("queued", "queued")
    runs.runner.stop(4)
    stopped = runs.wait_for(4, "finished", "failed", "stopped")
    assert (stopped.state, stopped.message) == ("stopped", "stopped before it started")
    for run_dir in run_dirs.values():
        open(os.path.join(run_dir, "go"), "w").close()
    for run_id in run_dirs:
        assert runs.wait_for(run_id, "finished", "failed", "stopped").state == "finished"
    assert not os.path.exists(os.path.join(never_run, "ran"))


def test_ten_runs_at_once_all_finish_with_their_own_output(make_runner):
    runs = Runs(make_runner(), make_runner.storage_dir)
    run_dirs = {run_id: runs.start(run_id, 'print("I am run %d")' % run_id)
                for run_id in range(1, 11)}
    for run_id, run_dir in run_dirs.items():
        ended = runs.wait_for(run_id, "finished", "failed", "stopped")
        assert (ended.state, ended.exit_code) == ("finished", 0)
        assert output_of(run_dir) == "I am run %d\n" % run_id


def test_a_script_sees_none_of_the_server_environment_nor_the_ray_token(make_runner):
    runs = Runs(make_runner(), make_runner.storage_dir)
    run_dir = runs.start(1, """
        import os
        for name, value in sorted(os.environ.items()):
            print(name, value)
    """)
    assert runs.wait_for(1, "finished", "failed", "stopped").state == "finished"
    seen = output_of(run_dir)
    names = {line.split(" ", 1)[0] for line in seen.splitlines()}
    assert names <= {"HOME", "LANG", "LC_ALL", "TZ", "TF_CPP_MIN_LOG_LEVEL", "PATH",
                     "PYTHONUNBUFFERED", "PYTHONPATH", storage.RUN_DIR_ENV, "PWD"}, names
    assert SERVER_SECRET not in seen
    token = os.environ.get("RAY_AUTH_TOKEN")
    assert make_runner.kind == "local" or (token and token not in seen)
