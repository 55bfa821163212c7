"""Real sandboxed runs of small Python scripts that try to get out: read secrets, see or
signal the server, reach the network, fork, fill the disk, escape the run's processes."""
import json
import os
import socket
import textwrap

import psutil
import pytest

from custom_keras import storage
from conftest import make_test_config, upload_script
from test_runner import (Recorder, run_processes, runners,  # noqa: F401 (runners: a fixture)
                         wait_until, write_script)
from visualizer import config, create_app, sandbox as sandboxing
from visualizer.runner import disk_use_bytes
from visualizer.sandbox import Cgroups, Sandbox

REPORT = "report.json"


def run_to_end(runner, run_dir, script, run_id=1, **start_args):
    recorder = Recorder(runner)
    runner.start(run_id, run_dir, script, **start_args)
    return recorder.wait_for(run_id, "finished", "failed", "stopped")


def report(run_dir):
    """What the script wrote into report.json (one JSON object)."""
    with open(os.path.join(run_dir, REPORT)) as f:
        return json.load(f)


REPORTING = """
    import json, os
    found = {}
    def attempt(name, function):
        try:
            found[name] = repr(function())
        except Exception as error:
            found[name] = type(error).__name__
    %s
    with open("report.json", "w") as f:
        json.dump(found, f)
"""


def reporting_script(tmp_path, name, body):
    return write_script(tmp_path, name, REPORTING % textwrap.indent(textwrap.dedent(body), "    ")
                        .strip())


def test_the_script_sees_no_instance_folder_no_other_user_and_no_repository_data(tmp_path,
                                                                                 runners):
    instance = tmp_path / "instance"
    instance.mkdir()
    (instance / "secret_key").write_text("the secret key")
    other = tmp_path / "storage" / "2" / "alices"
    other.mkdir(parents=True)
    (other / "alices.py").write_text("alice's work")
    (tmp_path / "storage" / "1").mkdir()
    run_dir, script = reporting_script(tmp_path / "storage" / "1", "mallory", """
        attempt("secret_key", lambda: open(%r).read())
        attempt("alice", lambda: open(%r).read())
        attempt("storage", lambda: os.listdir(%r))
        attempt("repository", lambda: sorted(os.listdir(%r)))
        attempt("shadow", lambda: open("/etc/shadow").read())
        attempt("passwd", lambda: open("/etc/passwd").read())
        attempt("root_home", lambda: sorted(os.listdir("/root")))
        attempt("write_library", lambda: open(%r, "w"))
        attempt("write_own_folder", lambda: open("mine.txt", "w").write("x"))
        attempt("write_tmp", lambda: open("/tmp/scratch", "w").write("x"))
    """ % (str(instance / "secret_key"), str(other / "alices.py"), str(tmp_path / "storage"),
           sandboxing.REPOSITORY_ROOT, os.path.join(sandboxing.LIBRARY_DIR, "evil.py")))

    update = run_to_end(runners(), run_dir, script)

    assert update.state == "finished", open(storage.output_path(run_dir)).read()
    found = report(run_dir)
    assert found["secret_key"] == "FileNotFoundError"
    assert found["alice"] == "FileNotFoundError"
    assert found["storage"] == repr(["1"])  # an empty folder on the way to its own
    repository = json.loads(found["repository"].replace("'", '"'))
    assert "instance" not in repository and "user_storage" not in repository
    assert "custom_keras" in repository
    assert found["shadow"] == found["passwd"] == "FileNotFoundError"
    assert found["write_library"] in ("OSError", "PermissionError")
    assert found["write_own_folder"] == "1" and found["write_tmp"] == "1"
    assert not os.path.exists(os.path.join(sandboxing.LIBRARY_DIR, "evil.py"))


def test_the_script_imports_the_callback_library_through_the_installed_package(tmp_path,
                                                                               runners):
    # no PYTHONPATH: the editable install's finder in the virtual environment points at
    # the repository's custom_keras, which the sandbox mounts read-only
    run_dir, script = reporting_script(tmp_path, "imports", """
        attempt("pythonpath", lambda: os.environ.get("PYTHONPATH"))
        attempt("storage", lambda: __import__("custom_keras.storage").storage.__file__)
    """)

    update = run_to_end(runners(), run_dir, script)

    assert update.state == "finished", open(storage.output_path(run_dir)).read()
    found = report(run_dir)
    assert found["pythonpath"] == "None"
    assert found["storage"] == repr(os.path.join(sandboxing.LIBRARY_DIR, "storage.py"))


def test_the_script_gets_only_the_allowed_environment_and_an_unprivileged_uid(tmp_path,
                                                                             runners, monkeypatch):
    monkeypatch.setenv("VISUALIZER_SECRET_KEY", "secret")
    monkeypatch.setenv("VISUALIZER_INSTANCE", str(tmp_path / "instance"))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    run_dir, script = reporting_script(tmp_path, "environment", """
        found["environment"] = dict(os.environ)
        found["uid"] = os.getuid()
        found["groups"] = os.getgroups()
    """)

    assert run_to_end(runners(), run_dir, script).state == "finished"
    found = report(run_dir)
    environment = found["environment"]
    environment.pop("PWD", None)  # bwrap's --chdir
    environment.pop("LC_CTYPE", None)  # Python's locale coercion
    assert environment == sandboxing.run_environment(run_dir)
    assert environment["VISUALIZER_RUN_DIR"] == run_dir and environment["HOME"] == "/tmp"
    assert environment["TF_CPP_MIN_LOG_LEVEL"] == "2"
    assert not any(name.startswith("VISUALIZER_") and name != "VISUALIZER_RUN_DIR"
                   for name in environment)
    if os.geteuid() == 0:
        assert found["uid"] == sandboxing.run_uid(str(tmp_path), 1) and found["groups"] == []
        assert os.stat(run_dir).st_uid == found["uid"]


def test_the_script_can_neither_see_nor_signal_outside_processes(tmp_path, runners):
    run_dir, script = reporting_script(tmp_path, "signals", """
        found["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        attempt("kill_server", lambda: os.kill(%d, 9))
        attempt("kill_init", lambda: os.kill(1, 9))
        attempt("kill_all", lambda: os.kill(-1, 9))
    """ % os.getpid())

    assert run_to_end(runners(), run_dir, script).state == "finished"
    found = report(run_dir)
    assert found["pids"] == [1, 2]  # the sandbox's init and the script
    assert found["kill_server"] == "ProcessLookupError"
    assert found["kill_init"] == "PermissionError"
    assert psutil.pid_exists(os.getpid())


@pytest.mark.parametrize("network", [False, True], ids=["default", "network_on"])
def test_the_script_reaches_the_network_only_when_allowed(tmp_path, runners, network):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        run_dir, script = reporting_script(tmp_path, "network", """
            import socket
            attempt("connect", lambda: socket.create_connection(("127.0.0.1", %d), timeout=5)
                    .close())
        """ % server.getsockname()[1])

        assert run_to_end(runners(sandbox=Sandbox(str(tmp_path), network=network)),
                          run_dir, script).state == "finished"
    assert report(run_dir)["connect"] == ("None" if network else "ConnectionRefusedError")


FORK_BOMB = """
    import os, time
    children = 0
    while children < 100000:
        try:
            if os.fork() == 0:
                time.sleep(600)
                os._exit(0)
            children += 1
        except OSError:
            time.sleep(0.01)
"""


@pytest.mark.parametrize("with_cgroups", [True, False], ids=["pids_cgroup", "rlimit_nproc"])
def test_a_fork_bomb_stops_at_the_process_limit_and_is_cleaned_up(tmp_path, runners,
                                                                   with_cgroups):
    cgroups = Cgroups.detect(str(tmp_path)) if with_cgroups else None
    if with_cgroups and not cgroups.has("pids"):
        pytest.skip("this machine has no writable pids cgroup")
    if not with_cgroups and os.geteuid() != 0:
        pytest.skip("RLIMIT_NPROC is per run only with a per-run uid (server as root)")
    run_dir, script = write_script(tmp_path, "bomb", FORK_BOMB)
    runner = runners(max_processes=40, cgroups=cgroups)
    recorder = Recorder(runner)
    runner.start(1, run_dir, script)
    most = 0

    def ended():
        nonlocal most
        most = max(most, len(run_processes(run_dir)))
        recorder.poll()
        return recorder.state(1) in ("finished", "failed", "stopped")
    wait_until(ended, "the fork bomb to end")

    update = recorder.latest[1]
    assert update.state == "failed"
    assert update.message == "process limit of 40 exceeded"
    assert most <= 40 + 3  # the wrapper, bwrap and its init are not the run's own
    assert run_processes(run_dir) == []


DISK_FILLER = """
    import itertools
    for n in itertools.count():
        with open("filler-%d" % n, "wb") as f:
            for _ in range(4):
                f.write(b"x" * 2 ** 20)
"""


# (the runner's per-run limit, the limit given to start): the smaller one holds, so a
# user's large remaining storage never lifts the per-run limit.
@pytest.mark.parametrize("runner_limit, start_limit", [(20, None), (1000, 20), (20, 1000)],
                         ids=["runner_default", "per_start", "per_start_cannot_raise_it"])
def test_a_disk_filler_is_stopped_and_failed_with_the_reason(tmp_path, runners, runner_limit,
                                                             start_limit):
    run_dir, script = write_script(tmp_path, "filler", DISK_FILLER)
    update = run_to_end(runners(disk_limit_mb=runner_limit), run_dir, script,
                        disk_limit_mb=start_limit)

    assert (update.state, update.message) == ("failed", "disk limit of 20 MB exceeded")
    assert storage.read_run_status(run_dir)["message"] == "disk limit of 20 MB exceeded"
    assert run_processes(run_dir) == []
    # Stopped within a poll or two of its write speed: it could fill the disk in seconds.
    assert disk_use_bytes(run_dir) < 2 * 2 ** 30


def test_one_file_cannot_grow_past_the_disk_limit(tmp_path, runners):
    run_dir, script = reporting_script(tmp_path, "big_file", """
        def write():
            with open("big", "wb") as f:
                f.write(b"x" * (30 * 2 ** 20))
        attempt("write", write)
    """)

    update = run_to_end(runners(disk_limit_mb=20), run_dir, script)
    assert os.path.getsize(os.path.join(run_dir, "big")) <= 20 * 2 ** 20
    if update.state == "finished":  # else the disk check stopped it first
        assert report(run_dir)["write"] == "OSError"  # EFBIG from RLIMIT_FSIZE


ESCAPING = """
    import os, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            open("escaped", "w").close()
            time.sleep(600)
        os._exit(0)
    while not os.path.exists("escaped"):
        time.sleep(0.05)
    if {wait}:
        time.sleep(600)
"""


@pytest.mark.parametrize("ended_by", ["stop", "wall_time", "shutdown", "script_exit"])
def test_a_child_that_escapes_its_session_is_killed_with_the_run(tmp_path, runners, ended_by):
    run_dir, script = write_script(tmp_path, "escaping",
                                   ESCAPING.format(wait=ended_by != "script_exit"))
    runner = runners(wall_time_s=2 if ended_by == "wall_time" else None)
    recorder = Recorder(runner)
    runner.start(1, run_dir, script)
    wait_until(lambda: os.path.exists(os.path.join(run_dir, "escaped")),
               "the escaped child to start")
    if ended_by != "script_exit":
        assert run_processes(run_dir)

    if ended_by == "stop":
        runner.stop(1)
    if ended_by == "shutdown":
        updates = runner.shutdown(stop_runs=True)
        assert updates[-1].state == "stopped"
    else:
        recorder.wait_for(1, "finished", "failed", "stopped")

    assert run_processes(run_dir) == []
    if runner.cgroups is not None:
        assert runner.cgroups.pids(1) == set()


def test_the_runner_never_writes_through_a_link_the_script_left(tmp_path, runners):
    outside = tmp_path / "outside.txt"
    outside.write_text("not the run's")
    run_dir, script = write_script(tmp_path, "links", "print('into output.txt')\n")
    os.symlink(outside, storage.output_path(run_dir))
    os.symlink(outside, storage.status_path(run_dir))

    assert run_to_end(runners(), run_dir, script).state == "finished"
    assert outside.read_text() == "not the run's"
    assert not os.path.islink(storage.output_path(run_dir))
    assert open(storage.output_path(run_dir)).read() == "into output.txt\n"
    assert storage.read_run_status(run_dir)["state"] == "finished"


def test_the_script_reads_inputs_that_the_server_wrote_for_itself_only(tmp_path, runners):
    run_dir, script = reporting_script(tmp_path, "inputs", """
        attempt("images", lambda: sorted(os.listdir("images")))
        attempt("image", lambda: len(open("images/digit.png", "rb").read()))
        attempt("overwrite_image", lambda: open("images/digit.png", "wb"))
    """)
    images = os.path.join(run_dir, "images")
    os.mkdir(images, 0o700)  # as the web app's mkdtemp makes it
    with open(os.path.join(images, "digit.png"), "wb") as f:
        f.write(b"png")
    os.chmod(os.path.join(images, "digit.png"), 0o600)
    os.chmod(os.path.join(run_dir, script), 0o600)
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    outside.chmod(0o600)
    os.symlink(outside, os.path.join(images, "link.png"))

    assert run_to_end(runners(), run_dir, script).state == "finished"
    found = report(run_dir)
    assert found["images"] == repr(["digit.png", "link.png"]) and found["image"] == "3"
    if os.geteuid() == 0:
        assert found["overwrite_image"] == "PermissionError"
    assert outside.stat().st_mode & 0o777 == 0o600


def test_disk_use_never_follows_a_link_out_of_the_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"x" * (4 * 2 ** 20))
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "small").write_bytes(b"x" * 1000)
    os.symlink(outside, folder / "dir_link")
    os.symlink(outside / "big", folder / "file_link")

    assert disk_use_bytes(str(folder)) < 2 ** 20
    assert disk_use_bytes(str(outside)) >= 4 * 2 ** 20


def test_a_machine_without_the_sandbox_refuses_runs_with_a_clear_message(tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setattr(sandboxing, "BWRAP", "bwrap-that-is-not-installed")
    app = create_app(make_test_config(tmp_path, RUNNER=None))
    try:
        assert "the sandbox that every run needs is not available" in capsys.readouterr().err
        client = app.test_client()
        client.post("/auth/register", data={"username": "alice_1", "password": "password123",
                                            "confirm": "password123"})
        client.post("/auth/login", data={"username": "alice_1", "password": "password123"})
        upload_script(client, "a.py")
        page = client.post("/scripts/1/run", data={"images": "none"}, follow_redirects=True)
        text = page.get_data(as_text=True)
        assert "a.py could not be started" in text
        assert "bwrap-that-is-not-installed not found" in text
        assert "VISUALIZER_SANDBOX=off" in text
    finally:
        app.extensions["runner"].shutdown()


@pytest.mark.parametrize("sandbox", ["on", "off"])
def test_every_page_warns_when_the_sandbox_is_off(tmp_path, sandbox):
    app = create_app(make_test_config(tmp_path, SANDBOX=sandbox))
    page = app.test_client().get("/auth/login").get_data(as_text=True)
    assert (sandboxing.OFF_MESSAGE in page) == (sandbox == "off")


def test_sandbox_settings_are_checked():
    settings = config.settings_from_env({"VISUALIZER_SANDBOX": "off", "VISUALIZER_RUN_NETWORK": "1",
                                         "VISUALIZER_RUN_DISK_MB": "100"})
    assert (settings["SANDBOX"], settings["RUN_NETWORK"], settings["RUN_DISK_MB"]) == (
        "off", True, 100)
    defaults = config.settings_from_env({})
    assert (defaults["SANDBOX"], defaults["RUN_NETWORK"], defaults["RUN_DISK_MB"]) == (
        "on", False, 2048)
    with pytest.raises(ValueError, match="VISUALIZER_SANDBOX must be on or off, got 'maybe'"):
        config.settings_from_env({"VISUALIZER_SANDBOX": "maybe"})


@pytest.mark.parametrize("version", [1, 2])
def test_cgroup_limits_and_counters_use_the_kernels_file_names(tmp_path, version):
    # A stand-in folder for each hierarchy: the files the kernel would provide.
    parents = {name: (version, str(tmp_path / name / "visualizer-x"))
               for name in ("memory", "pids")}
    cgroups = Cgroups(parents)
    procs = cgroups.create(7, memory_limit_bytes=2 ** 30, max_processes=64)

    memory, pids = tmp_path / "memory/visualizer-x/run-7", tmp_path / "pids/visualizer-x/run-7"
    assert procs == [str(memory / "cgroup.procs"), str(pids / "cgroup.procs")]
    limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
    assert (memory / limit_file).read_text() == str(2 ** 30)
    assert (pids / "pids.max").read_text() == "64"
    assert not cgroups.memory_limit_hit(7) and not cgroups.process_limit_hit(7)
    if version == 1:
        (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    else:
        (memory / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (pids / "pids.events").write_text("max 2\n")
    assert cgroups.memory_limit_hit(7) and cgroups.process_limit_hit(7)


def test_runs_get_tensorflows_log_noise_off_unless_the_server_sets_a_level():
    assert sandboxing.run_environment("/runs/1", environ={})["TF_CPP_MIN_LOG_LEVEL"] == "2"
    assert sandboxing.run_environment("/runs/1", environ={"TF_CPP_MIN_LOG_LEVEL": "0"})[
        "TF_CPP_MIN_LOG_LEVEL"] == "0"
