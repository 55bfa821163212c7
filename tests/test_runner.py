"""LocalRunner with real sandboxed subprocesses: tiny Python scripts written to tmp_path, no
TensorFlow. tests/test_sandbox.py tries to get out of the sandbox."""
import os
import signal
import subprocess
import textwrap
import time

import psutil
import pytest

from custom_keras import storage
from visualizer.runner import GONE_MESSAGE, LocalRunner, RunUpdate
from visualizer.sandbox import Cgroups, Sandbox

TIMEOUT_S = 30


def write_script(tmp_path, name, code):
    """A run folder ``tmp_path/name`` holding ``name.py`` with ``code``; returns (run_dir, file)."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / (name + ".py")).write_text(textwrap.dedent(code))
    return str(run_dir), name + ".py"


def wait_until(condition, what):
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail("gave up waiting for " + what)


class Recorder:
    """Polls a runner and keeps the latest update of each run."""

    def __init__(self, runner):
        self.runner = runner
        self.latest = {}
        self.history = []

    def poll(self):
        for update in self.runner.poll():
            self.history.append(update)
            self.latest[update.run_id] = update

    def state(self, run_id):
        update = self.latest.get(run_id)
        return update.state if update else None

    def wait_for(self, run_id, *states):
        def reached():
            self.poll()
            return self.state(run_id) in states
        wait_until(reached, "run %s to be %s" % (run_id, " or ".join(states)))
        return self.latest[run_id]


def process_running(pid):
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run_processes(run_dir):
    """Pids of the live processes of the run in ``run_dir`` (wrapper, sandbox, script and
    whatever it started, escaped or not): all carry VISUALIZER_RUN_DIR."""
    found = []
    for process in psutil.process_iter():
        try:
            if (process.environ().get(storage.RUN_DIR_ENV) == str(run_dir)
                    and process.status() != psutil.STATUS_ZOMBIE):
                found.append(process.pid)
        except psutil.Error:
            pass
    return found


def read_output(run_dir):
    with open(storage.output_path(run_dir)) as f:
        return f.read()


@pytest.fixture
def runners(tmp_path):
    """Makes sandboxed LocalRunners (with cgroups where the machine has them) of one
    installation, shut down (their runs stopped) after the test."""
    made = []

    def make(**kwargs):
        kwargs.setdefault("grace_period_s", 0.5)
        kwargs.setdefault("sandbox", Sandbox(str(tmp_path)))
        if "cgroups" not in kwargs:  # detect() makes the installation's cgroup folders
            kwargs["cgroups"] = Cgroups.detect(str(tmp_path))
        made.append(LocalRunner(**kwargs))
        return made[-1]
    yield make
    for runner in made:
        runner.shutdown(stop_runs=True)


def test_script_that_prints_and_exits_0_is_finished(tmp_path, runners):
    run_dir, script = write_script(tmp_path, "hello", """
        import os, sys
        print("to stdout")
        print("to stderr", file=sys.stderr)
        print("run dir", os.environ["VISUALIZER_RUN_DIR"], "cwd", os.getcwd())
        print("secret key visible:", "VISUALIZER_SECRET_KEY" in os.environ)
        from custom_keras import storage  # the repository is on the script's path
    """)
    os.environ["VISUALIZER_SECRET_KEY"] = "secret"
    try:
        recorder = Recorder(runners())
        recorder.runner.start(1, run_dir, script)
    finally:
        del os.environ["VISUALIZER_SECRET_KEY"]
    update = recorder.wait_for(1, "finished", "failed")

    assert (update.state, update.exit_code, update.message) == ("finished", 0, None)
    assert update.started_at <= update.ended_at
    assert [u.state for u in recorder.history] == ["queued", "running", "finished"]
    output = read_output(run_dir)
    assert "to stdout\n" in output and "to stderr\n" in output
    assert "run dir %s cwd %s" % (run_dir, run_dir) in output
    assert "secret key visible: False" in output
    status = storage.read_run_status(run_dir)
    assert (status["state"], status["exit_code"]) == ("finished", 0)


def test_script_that_raises_is_failed_with_its_traceback(tmp_path, runners):
    run_dir, script = write_script(tmp_path, "broken", """
        print("before the error")
        raise RuntimeError("the model did not compile")
    """)
    recorder = Recorder(runners())
    recorder.runner.start(7, run_dir, script)
    update = recorder.wait_for(7, "finished", "failed")

    assert (update.state, update.exit_code, update.message) == ("failed", 1, "exited with code 1")
    output = read_output(run_dir)
    assert "before the error" in output
    assert "Traceback (most recent call last)" in output
    assert "RuntimeError: the model did not compile" in output
    status = storage.read_run_status(run_dir)
    assert (status["state"], status["exit_code"], status["message"]) == (
        "failed", 1, "exited with code 1")


def test_script_killed_by_a_signal_is_failed_with_the_signal_named(tmp_path, runners):
    run_dir, script = write_script(tmp_path, "killed", """
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    recorder = Recorder(runners())
    recorder.runner.start(1, run_dir, script)
    update = recorder.wait_for(1, "finished", "failed")

    assert (update.state, update.exit_code, update.message) == (
        "failed", -signal.SIGKILL, "killed by signal SIGKILL")


CHILD_SCRIPT = """
    import os, signal, subprocess, sys, time
    if {ignore_term}:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "600"])
    with open("child.pid", "w") as f:
        f.write(str(child.pid))
    print("started child", child.pid)
    time.sleep(600)
"""
# The wrapper, the sandbox's bwrap and its init, the script and its child.
PROCESSES_WITH_CHILD = 5


@pytest.mark.parametrize("ignore_term", [False, True], ids=["obeys_sigterm", "ignores_sigterm"])
def test_stop_ends_the_script_and_the_children_it_started(tmp_path, runners, ignore_term):
    run_dir, script = write_script(tmp_path, "with_child", CHILD_SCRIPT.format(ignore_term=ignore_term))
    recorder = Recorder(runners())
    recorder.runner.start(3, run_dir, script)
    running = recorder.wait_for(3, "running")
    wait_until(lambda: len(run_processes(run_dir)) == PROCESSES_WITH_CHILD,
               "the script to start its child")
    assert process_running(running.pid)

    recorder.runner.stop(3)
    update = recorder.wait_for(3, "stopped", "finished", "failed")

    assert (update.state, update.message) == ("stopped", "stopped by the user")
    assert run_processes(run_dir) == []
    assert storage.read_run_status(run_dir)["state"] == "stopped"


def test_leftover_children_are_ended_when_the_script_exits(tmp_path, runners):
    run_dir, script = write_script(tmp_path, "leaves_child", """
        import subprocess
        child = subprocess.Popen(["sleep", "600"])
        with open("child.pid", "w") as f:
            f.write(str(child.pid))
    """)
    recorder = Recorder(runners())
    recorder.runner.start(1, run_dir, script)
    update = recorder.wait_for(1, "finished", "failed")

    assert update.state == "finished"
    assert os.path.exists(os.path.join(run_dir, "child.pid"))
    assert run_processes(run_dir) == []


# Waits for a file "release" in its run folder (the one folder a sandboxed script sees).
WAIT_FOR_RELEASE = """
    import os, time
    print("started")
    while not os.path.exists("release"):
        time.sleep(0.05)
"""


def release(*run_dirs):
    for run_dir in run_dirs:
        with open(os.path.join(run_dir, "release"), "w"):
            pass


def test_third_run_waits_queued_while_two_run_then_runs(tmp_path, runners):
    recorder = Recorder(runners(max_concurrent=2))
    run_dirs = {}
    for run_id in (1, 2, 3):
        run_dir, script = write_script(tmp_path, "run%d" % run_id,
                                       WAIT_FOR_RELEASE)
        run_dirs[run_id] = run_dir
        recorder.runner.start(run_id, run_dir, script)
    recorder.wait_for(1, "running")
    recorder.wait_for(2, "running")
    recorder.poll()

    assert recorder.state(3) == "queued"
    assert storage.read_run_status(run_dirs[3])["state"] == "queued"
    assert not os.path.exists(storage.output_path(run_dirs[3]))

    release(*run_dirs.values())
    for run_id in (1, 2, 3):
        assert recorder.wait_for(run_id, "finished", "failed").state == "finished"
    # FIFO: the third run started only after one of the first two had ended.
    states = [(u.run_id, u.state) for u in recorder.history]
    assert states.index((3, "running")) > min(states.index((1, "finished")),
                                              states.index((2, "finished")))
    assert read_output(run_dirs[3]) == "started\n"


def test_stopping_a_queued_run_never_starts_it(tmp_path, runners):
    recorder = Recorder(runners(max_concurrent=1))
    first_dir, first = write_script(tmp_path, "first", WAIT_FOR_RELEASE)
    second_dir, second = write_script(tmp_path, "second", WAIT_FOR_RELEASE)
    recorder.runner.start(1, first_dir, first)
    recorder.runner.start(2, second_dir, second)
    recorder.runner.stop(2)
    release(first_dir, second_dir)

    assert recorder.wait_for(1, "finished").state == "finished"
    assert (recorder.state(2), recorder.latest[2].message) == ("stopped", "stopped before it started")
    assert [u.state for u in recorder.history if u.run_id == 2] == ["queued", "stopped"]
    assert not os.path.exists(storage.output_path(second_dir))


def test_wall_time_limit_fails_the_run(tmp_path, runners):
    run_dir, script = write_script(tmp_path, "slow", """
        import time
        print("training forever")
        time.sleep(600)
    """)
    recorder = Recorder(runners(wall_time_s=1))
    recorder.runner.start(1, run_dir, script)
    update = recorder.wait_for(1, "finished", "failed", "stopped")

    assert (update.state, update.message) == ("failed", "wall time limit of 1 s exceeded")
    assert storage.read_run_status(run_dir)["message"] == "wall time limit of 1 s exceeded"


@pytest.mark.parametrize("with_cgroups", [True, False], ids=["cgroup", "watchdog"])
def test_memory_limit_counts_the_children_even_escaped_ones(tmp_path, runners, with_cgroups):
    # The script itself stays small; the child it starts leaves its session and takes 200 MB.
    run_dir, script = write_script(tmp_path, "hungry", """
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c",
                          "import time; data = b'x' * (200 * 2 ** 20); time.sleep(600)"],
                         start_new_session=True)
        time.sleep(600)
    """)
    cgroups = Cgroups.detect(str(tmp_path)) if with_cgroups else None
    if with_cgroups and not cgroups.has("memory"):
        pytest.skip("this machine has no writable memory cgroup")
    recorder = Recorder(runners(memory_limit_mb=100, cgroups=cgroups))
    recorder.runner.start(1, run_dir, script)
    update = recorder.wait_for(1, "finished", "failed", "stopped")

    assert update.state == "failed"
    assert update.message.startswith("memory limit of 100 MB exceeded")
    assert run_processes(run_dir) == []


def test_small_run_under_the_limits_finishes(tmp_path, runners):
    run_dir, script = write_script(tmp_path, "small", "print('fine')\n")
    recorder = Recorder(runners(memory_limit_mb=500, wall_time_s=60))
    recorder.runner.start(1, run_dir, script)

    assert recorder.wait_for(1, "finished", "failed").state == "finished"


def test_reconcile_fails_vanished_runs_and_adopts_live_ones(tmp_path, runners):
    before_restart = runners()
    live_dir, live = write_script(tmp_path, "live", WAIT_FOR_RELEASE
                                  + "    print('done')\n    raise SystemExit(3)\n")
    before_restart.start(1, live_dir, live)
    live_pid = Recorder(before_restart).wait_for(1, "running").pid
    before_restart.shutdown(stop_runs=False)  # the server goes down, the run goes on

    gone_dir, gone = write_script(tmp_path, "gone", "print('never ran')\n")
    storage.write_run_status(gone_dir, "running")
    ended = subprocess.Popen(["true"])
    ended.wait()
    reused_dir, reused = write_script(tmp_path, "reused", "print('never ran')\n")
    storage.write_run_status(reused_dir, "running")
    queued_dir, queued = write_script(tmp_path, "queued", "print('ran after the restart')\n")

    after_restart = runners()
    updates = after_restart.reconcile([
        (1, "running", live_pid, live_dir, live),
        (2, "running", ended.pid, gone_dir, gone),
        (3, "running", os.getpid(), reused_dir, reused),  # a live pid that is not that run
        (4, "queued", None, queued_dir, queued),
    ])

    by_id = {u.run_id: u for u in updates}
    assert (by_id[1].state, by_id[1].pid) == ("running", live_pid)
    assert (by_id[2].state, by_id[2].message) == ("failed", GONE_MESSAGE)
    assert (by_id[3].state, by_id[3].message) == ("failed", GONE_MESSAGE)
    assert by_id[4].state == "queued"
    assert storage.read_run_status(gone_dir)["message"] == GONE_MESSAGE

    recorder = Recorder(after_restart)
    assert recorder.wait_for(4, "finished").exit_code == 0
    assert process_running(live_pid) and 1 not in recorder.latest  # still waiting, adopted
    release(live_dir)
    update = recorder.wait_for(1, "finished", "failed")
    # The wrapper recorded the exit code, so the adopting runner reports the real outcome.
    assert (update.state, update.exit_code, update.message) == ("failed", 3, "exited with code 3")
    assert read_output(live_dir).endswith("done\n")


def test_reconcile_reports_how_a_run_ended_while_the_server_was_down(tmp_path, runners):
    run_dir, script = write_script(tmp_path, "quick", "print('done')\n")
    before_restart = runners()
    before_restart.start(5, run_dir, script)
    pid = Recorder(before_restart).wait_for(5, "running").pid
    before_restart.shutdown(stop_runs=False)
    wait_until(lambda: not process_running(pid), "the run to end")

    updates = runners().reconcile([(5, "running", pid, run_dir, script)])

    assert updates == [RunUpdate(5, "finished", 0, None, None, updates[0].ended_at, None)]


@pytest.mark.parametrize("database_state", ["queued", "running"])
def test_reconcile_finds_a_run_that_started_just_before_the_server_died(tmp_path, runners,
                                                                        database_state):
    # The runner reports 'running' and the pid a moment after the start; a server
    # killed in between leaves a database without them (no pid, maybe still 'queued').
    run_dir, script = write_script(tmp_path, "just_started", WAIT_FOR_RELEASE)
    before_restart = runners()
    before_restart.start(1, run_dir, script)
    pid = Recorder(before_restart).wait_for(1, "running").pid
    before_restart.shutdown(stop_runs=False)

    after_restart = runners()
    update, = after_restart.reconcile([(1, database_state, None, run_dir, script)])

    assert (update.state, update.pid) == ("running", pid)
    assert after_restart.poll() == []  # adopted, not started a second time
    release(run_dir)
    assert Recorder(after_restart).wait_for(1, "finished").exit_code == 0
    assert read_output(run_dir) == "started\n"


def test_adopted_run_can_be_stopped(tmp_path, runners):
    run_dir, script = write_script(tmp_path, "adopted", CHILD_SCRIPT.format(ignore_term=False))
    before_restart = runners()
    before_restart.start(1, run_dir, script)
    pid = Recorder(before_restart).wait_for(1, "running").pid
    before_restart.shutdown(stop_runs=False)
    wait_until(lambda: len(run_processes(run_dir)) == PROCESSES_WITH_CHILD,
               "the script to start its child")

    recorder = Recorder(runners())
    assert recorder.runner.reconcile([(1, "running", pid, run_dir, script)])[0].state == "running"
    recorder.runner.stop(1)
    update = recorder.wait_for(1, "stopped", "failed", "finished")

    assert update.state == "stopped"
    assert not process_running(pid)
    assert run_processes(run_dir) == []


def test_shutdown_stops_running_runs_and_reports_them(tmp_path):
    run_dir, script = write_script(tmp_path, "endless", CHILD_SCRIPT.format(ignore_term=True))
    delivered = []
    runner = LocalRunner(grace_period_s=0.5, on_update=delivered.append,
                         sandbox=Sandbox(str(tmp_path)), cgroups=Cgroups.detect(str(tmp_path)))
    runner.start_monitor(interval=0.05)
    runner.start(1, run_dir, script)
    wait_until(lambda: any(u.state == "running" for u in delivered), "the monitor to report running")
    pid = [u.pid for u in delivered if u.state == "running"][0]

    runner.shutdown(stop_runs=True)

    assert (delivered[-1].state, delivered[-1].message) == (
        "stopped", "stopped because the server shut down")
    assert not process_running(pid)
    assert run_processes(run_dir) == []
    assert storage.read_run_status(run_dir)["state"] == "stopped"


def test_bad_arguments_get_clear_messages(tmp_path, runners):
    runner = runners()
    with pytest.raises(ValueError, match="max_concurrent must be at least 1"):
        LocalRunner(max_concurrent=0)
    with pytest.raises(ValueError, match="wall_time_s must be positive"):
        LocalRunner(wall_time_s=-1)
    with pytest.raises(ValueError, match="disk_limit_mb must be positive"):
        runner.start(1, str(tmp_path), "x.py", disk_limit_mb=0)
    with pytest.raises(ValueError, match="run_dir .* is not a folder"):
        runner.start(1, str(tmp_path / "missing"), "x.py")
    with pytest.raises(ValueError, match="script_file 'missing.py' does not exist"):
        runner.start(1, str(tmp_path), "missing.py")
    run_dir, script = write_script(tmp_path, "twice", "import time; time.sleep(600)\n")
    runner.start(1, run_dir, script)
    with pytest.raises(ValueError, match="run 1 is already queued or running"):
        runner.start(1, run_dir, script)
    runner.stop(99)  # not queued or running (it may just have ended): nothing to do
    assert {u.run_id for u in runner.poll()} == {1}
