"""Faults against the real servers: killed runs, killed and stopped servers, write
errors in the storage folder, a flood of output, and a burst of runs.

Runs here are tiny scripts (``harness.fake_training`` writes the run-folder
format without importing keras), so the suite stays fast on two cores.
"""
import contextlib
import os
import shutil
import signal
import subprocess
import time

import pytest

from custom_bokeh.dashboard import snapshot_label
from custom_keras import storage
from e2e.harness import (Servers, WebUser, bokeh_state, fake_training, files_under, host_pid,
                         png_bytes, process_alive, read_status_file, record_measurement,
                         screenshot, wait_for)

SALIENCY = "saliency_maps.pickle"
SHORT_FAILING = ("import time\nprint('short run', flush=True)\ntime.sleep(1.5)\n"
                 "raise SystemExit(3)\n")
QUICK = "print('queued run ran')\n"


def snapshot_count(run_dir):
    index = os.path.join(storage.history_dir(str(run_dir), SALIENCY), storage.HISTORY_INDEX)
    try:
        with open(index) as f:
            return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return 0


def outcome(status):
    """The state, exit code and message of a status.json answer."""
    return {key: status[key] for key in ("state", "exit_code", "message")}


def script_pid(run_dir):
    """The pid on this machine of the fake training script (it writes its pid inside the
    sandbox), once it wrote it."""
    try:
        return host_pid(run_dir, int((run_dir / "script.pid").read_text()))
    except (FileNotFoundError, ValueError):
        return None


@pytest.fixture
def fresh_servers(tmp_path):
    """Servers of a test's own, for tests that kill or restart them: ``fresh_servers(**settings)``."""
    created = []

    def start(**settings):
        instance = Servers(tmp_path / ("servers%d" % len(created)), **settings)
        created.append(instance)
        return instance.start()

    yield start
    for instance in created:
        instance.cleanup()


@pytest.mark.slow
def test_killed_run_is_failed_and_dashboards_show_its_last_snapshot(make_user, servers,
                                                                    browser):
    user = make_user("killed_run_user")
    script_id = user.upload_script("killed.py", fake_training("killed", snapshots=200,
                                                               interval_s=0.2))
    user.run(script_id, image=("digit.png", png_bytes()))
    folder = user.run_dir(script_id, "killed")
    wait_for(lambda: snapshot_count(folder) >= 3, 60, what="three snapshots")
    os.kill(script_pid(folder), signal.SIGKILL)

    status = user.wait_for_state(script_id, ("finished", "failed", "stopped"), 30)
    assert status == {"run": int(folder.name), "state": "failed", "exit_code": -signal.SIGKILL,
                      "message": "killed by signal SIGKILL", "alert_count": 0}
    count = snapshot_count(folder)
    rows = len(storage.read_table(str(folder), storage.results_path(
        str(folder), "training_progress.tsv"))[1])

    context = browser.new_context(storage_state=user.request.storage_state())
    page = context.new_page()
    try:
        page.goto("%s/scripts/%d" % (servers.url, script_id))
        assert "failed" in page.inner_text(".facts")
        assert "killed by signal SIGKILL" in page.inner_text(".facts")
        page.goto("%s/scripts/%d/techniques/saliency_maps" % (servers.url, script_id))
        label = snapshot_label({"epoch": 0, "batch": count - 1}, count - 1, count)
        state = wait_for(lambda: (lambda s: s if label in s["texts"] and s["images"] else None)(
            bokeh_state(page)), 30, what="the last snapshot %r" % label)
        assert not [t for t in state["texts"] if t.startswith(("Refused", "Could not"))]
        screenshot(page, "fault_killed_run_saliency")
        page.goto("%s/scripts/%d/techniques/training_progress" % (servers.url, script_id))
        wait_for(lambda: bokeh_state(page)["progress"] == rows, 30,
                 what="all %d training-progress rows" % rows)
        screenshot(page, "fault_killed_run_progress")
    finally:
        context.close()


def _start_three_runs(user):
    """A long run and a short failing run running, a quick one queued (VISUALIZER_MAX_RUNS=2)."""
    ids = {"long": user.upload_script("long_run.py", fake_training("long_run", snapshots=200,
                                                                    interval_s=0.3)),
           "short": user.upload_script("short_run.py", SHORT_FAILING),
           "queued": user.upload_script("queued_run.py", QUICK)}
    user.run(ids["long"])
    user.wait_for_state(ids["long"], "running", 20)
    user.run(ids["short"])
    user.wait_for_state(ids["short"], "running", 20)
    user.run(ids["queued"])
    assert user.status(ids["queued"])["state"] == "queued"
    long_dir = user.run_dir(ids["long"], "long_run")
    wait_for(lambda: snapshot_count(long_dir) >= 2, 30, what="the long run to train")
    return ids, long_dir


@pytest.mark.slow
def test_server_killed_during_runs_comes_back_with_their_true_states(playwright, fresh_servers):
    """SIGKILL of ``python -m visualizer`` only: runs live on in their own process groups."""
    servers = fresh_servers(VISUALIZER_MAX_RUNS="2")
    user = WebUser(playwright, servers, "restart_kill").register_and_login()
    ids, long_dir = _start_three_runs(user)
    long_pid = script_pid(long_dir)

    servers.stop(signal.SIGKILL)
    wait_for(lambda: not servers.bokeh_pids(), 15, what="the Bokeh server to end with its parent")
    assert process_alive(long_pid)
    short_dir = user.run_dir(ids["short"], "short_run")
    wait_for(lambda: (read_status_file(short_dir) or {}).get("state") == "failed", 30,
             what="the short run to end while the server is down")

    servers.start()  # the session cookie stays valid: the secret key is in the instance folder
    assert outcome(user.status(ids["short"])) == {"state": "failed", "exit_code": 3,
                                                  "message": "exited with code 3"}
    assert user.status(ids["long"])["state"] == "running"
    assert user.wait_for_state(ids["queued"], ("finished", "failed"), 30)["state"] == "finished"
    assert "queued run ran" in user.get("/scripts/%d/output.json" % ids["queued"]).json()["lines"]
    # The adopted run still trains, and the restarted server can stop it.
    count = snapshot_count(long_dir)
    wait_for(lambda: snapshot_count(long_dir) > count, 10, what="the adopted run to go on")
    stop = user.post("/scripts/%d/stop" % ids["long"], form={"csrf_token": user.csrf_token()})
    assert stop.status == 302
    final = user.wait_for_state(ids["long"], ("finished", "failed", "stopped"), 30)
    assert final["state"] == "stopped" and final["message"] == "stopped by the user", final
    assert not process_alive(long_pid)


@pytest.mark.slow
def test_server_stopped_with_sigterm_stops_runs_and_says_so_after_restart(playwright,
                                                                         fresh_servers):
    """SIGTERM (Ctrl-C) stops the runs too, by design; queued runs wait for the next start."""
    servers = fresh_servers(VISUALIZER_MAX_RUNS="2")
    user = WebUser(playwright, servers, "restart_term").register_and_login()
    ids, long_dir = _start_three_runs(user)
    long_pid = script_pid(long_dir)

    servers.stop(signal.SIGTERM)
    assert servers.process.returncode == 0
    assert not servers.bokeh_pids()
    assert not process_alive(long_pid)
    assert not servers.run_pids()
    assert read_status_file(long_dir)["state"] == "stopped"

    servers.start()
    for key in ("long", "short"):
        assert outcome(user.status(ids[key])) == {
            "state": "stopped", "exit_code": -signal.SIGTERM,
            "message": "stopped because the server shut down"}, key
    assert user.wait_for_state(ids["queued"], ("finished", "failed"), 30)["state"] == "finished"
    assert "stopped because the server shut down" in user.get("/scripts/%d" % ids["long"]).text()


@contextlib.contextmanager
def file_instead_of_user_folder(user, script_id, stem, tmp_path):
    """Puts a file where the user's storage folder should be, and the folder back after.

    ``stem`` is the script's name without .py: unique among the tests' users, so that
    ``user.run_dir`` finds one folder.
    """
    user_folder = user.script_dir(stem).parent
    shutil.move(str(user_folder), str(tmp_path / "moved"))
    user_folder.write_text("a file where the user's folder should be")
    try:
        yield user_folder
    finally:
        user_folder.unlink()
        shutil.move(str(tmp_path / "moved"), str(user_folder))


def test_a_file_where_the_users_folder_should_be_leaves_the_server_up(make_user, tmp_path):
    user = make_user("blocked_folder")
    script_id = user.upload_script("first.py", "print('first')\n")
    with file_instead_of_user_folder(user, script_id, "first", tmp_path) as user_folder:
        upload = user.upload("second.py", "print('second')\n")
        run = user.post("/scripts/%d/run" % script_id,
                        multipart={"csrf_token": user.csrf_token(), "images": "none"})
        assert upload.status >= 400 and run.status >= 300
        listing = user.get("/")
        assert listing.status == 200 and "second.py" not in listing.text()
        assert user_folder.read_text() == "a file where the user's folder should be"
        assert user.status(script_id)["state"] in (None, "failed")
    # Repaired, everything works again.
    user.run(script_id)
    assert user.wait_for_state(script_id, ("finished", "failed"), 30)["state"] == "finished"


def test_a_file_where_the_users_folder_should_be_is_named_in_the_message(make_user, tmp_path):
    user = make_user("blocked_message")
    script_id = user.upload_script("named.py", "print('named')\n")
    with file_instead_of_user_folder(user, script_id, "named", tmp_path):
        upload = user.upload("second.py", "print('second')\n")
        assert "Not a directory" in upload.text(), upload.text()
        run = user.post("/scripts/%d/run" % script_id,
                        multipart={"csrf_token": user.csrf_token(), "images": "none"})
        page = (user.get(run.headers["location"]).text() if run.status == 302
                else run.text())
        assert "Not a directory" in page, page


@pytest.fixture
def full_disk(tmp_path):
    """A 512 kB tmpfs as the storage folder, and ``fill()`` / ``free()`` for its space.

    Mounting needs root (CAP_SYS_ADMIN); chmod cannot make a folder unwritable
    for root, a full file system can.
    """
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs",
                             str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a small tmpfs (needs root): %s" % result.stderr.strip())
    filler = mount_point / "filler"

    def fill():
        with open(filler, "ab", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:  # the file system is full
                pass

    def free():
        filler.unlink()

    yield mount_point, fill, free
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.slow
def test_full_disk_refuses_uploads_and_runs_and_the_server_recovers(playwright, fresh_servers,
                                                                     full_disk):
    mount_point, fill, free = full_disk
    servers = fresh_servers(VISUALIZER_STORAGE=str(mount_point))
    user = WebUser(playwright, servers, "full_disk").register_and_login()
    script_id = user.upload_script("chatty.py", "print('hello ' * 20000)\n")
    fill()
    before = files_under(mount_point)

    upload = user.upload("too_much.py", "# text\n" * 20000)
    assert upload.status >= 400
    assert files_under(mount_point) == before  # the half-written script was removed
    run = user.post("/scripts/%d/run" % script_id, multipart={
        "csrf_token": user.csrf_token(), "images": "new",
        "image": {"name": "digit.png", "mimeType": "image/png", "buffer": png_bytes()}})
    assert run.status >= 300
    listing = user.get("/")
    assert listing.status == 200 and "too_much.py" not in listing.text()
    wait_for(lambda: user.status(script_id)["state"] in (None, "failed"), 10,
             what="the run on a full disk to be refused or failed")

    free()
    user.run(script_id, image=("digit.png", png_bytes()))
    assert user.wait_for_state(script_id, ("finished", "failed"), 30)["state"] == "finished"
    assert user.upload_script("now_fits.py", "print('fits')\n")


@pytest.mark.slow
def test_run_that_fills_the_disk_fails_and_later_runs_are_still_tracked(playwright,
                                                                        fresh_servers,
                                                                        full_disk):
    mount_point, fill, free = full_disk
    servers = fresh_servers(VISUALIZER_STORAGE=str(mount_point))
    user = WebUser(playwright, servers, "disk_filler").register_and_login()
    flood = user.upload_script("flood.py", "import sys\nwhile True:\n"
                                           "    sys.stdout.write('x' * 65536)\n")
    after = user.upload_script("after.py", "print('after')\n")
    user.run(flood)
    status = user.wait_for_state(flood, ("finished", "failed", "stopped"), 20)
    assert status["state"] == "failed", status
    assert os.statvfs(mount_point).f_bavail == 0
    os.remove(storage.output_path(str(user.run_dir(flood, "flood"))))
    user.run(after)
    assert user.wait_for_state(after, ("finished", "failed"), 20)["state"] == "finished"


@pytest.mark.slow
def test_a_script_printing_100_mb_keeps_server_memory_flat(make_user, servers):
    user = make_user("flood_user")
    script_id = user.upload_script("flood_100mb.py", (
        "import sys\n"
        "chunk = ('y' * 99 + '\\n') * 10000  # 1 MB of lines\n"
        "for _ in range(100):\n"
        "    sys.stdout.write(chunk)\n"
        "sys.stdout.write('z' * (4 * 1024 * 1024) + '\\n')  # one 4 MB line\n"
        "for i in range(60):\n"
        "    print('tail line %d' % i)\n"
        "print('the end', flush=True)\n"))
    for _ in range(5):  # warm up the request path before measuring
        user.get("/scripts/%d/output.json" % script_id)
    rss_before = servers.rss_kb()
    user.run(script_id)
    slowest, requests = 0.0, 0
    while True:
        started = time.time()
        data = user.get("/scripts/%d/output.json" % script_id).json()
        slowest, requests = max(slowest, time.time() - started), requests + 1
        if data["state"] in ("finished", "failed", "stopped"):
            break
    for _ in range(20):
        started = time.time()
        data = user.get("/scripts/%d/output.json" % script_id).json()
        slowest = max(slowest, time.time() - started)
    page = user.get("/scripts/%d/output" % script_id)
    rss_after = servers.rss_kb()
    output_size = os.path.getsize(storage.output_path(str(user.run_dir(script_id,
                                                                       "flood_100mb"))))
    record_measurement("flood_100mb", {
        "output_mb": round(output_size / 2 ** 20, 1), "server_rss_before_mb": rss_before // 1024,
        "server_rss_after_mb": rss_after // 1024, "output_json_requests": requests + 20,
        "slowest_output_json_s": round(slowest, 3)})

    assert data["state"] == "finished"
    assert output_size > 100 * 10 ** 6
    assert len(data["lines"]) == 50
    assert data["lines"][-1] == "the end" and data["lines"][-2] == "tail line 59"
    assert page.status == 200 and "tail line 59" in page.text()
    assert rss_after - rss_before < 32 * 1024, (rss_before, rss_after)


@pytest.mark.slow
def test_ten_runs_at_once_stay_under_the_concurrency_limit_and_all_finish(make_user, servers):
    limit = int(servers.env["VISUALIZER_MAX_RUNS"])
    user = make_user("burst_user")
    source = "import time\nprint('start', flush=True)\ntime.sleep(1.0)\nprint('end')\n"
    ids = [user.upload_script("burst_%d.py" % n, source) for n in range(10)]
    token = user.csrf_token()
    for script_id in ids:
        response = user.post("/scripts/%d/run" % script_id,
                             multipart={"csrf_token": token, "images": "none"})
        assert response.status == 302
    folders = [user.run_dir(script_id, "burst_%d" % n) for n, script_id in enumerate(ids)]
    most_running, most_processes, samples = 0, 0, 0
    while True:
        states = [(read_status_file(folder) or {}).get("state") for folder in folders]
        burst_dirs = {d for d in servers.run_pids().values() if "/burst_" in d}
        most_running = max(most_running, states.count("running"))
        most_processes = max(most_processes, len(burst_dirs))
        samples += 1
        if all(state in ("finished", "failed", "stopped") for state in states):
            break
        time.sleep(0.05)
    record_measurement("ten_runs", {"limit": limit, "most_running": most_running,
                                    "most_run_folders_with_processes": most_processes,
                                    "samples": samples})
    assert most_running == limit and most_processes <= limit
    for script_id in ids:
        status = user.wait_for_state(script_id, ("finished", "failed", "stopped"), 30)
        assert status["state"] == "finished" and status["exit_code"] == 0
        assert user.get("/scripts/%d/output.json" % script_id).json()["lines"] == ["start", "end"]


# --- runs that attack the machine: each is stopped, and nothing of it is left -----------

RUN_PROCESSES = 64
RUN_DISK_MB = 20
FORK_BOMB = """import os, time
while True:
    try:
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
    except OSError:
        time.sleep(0.01)
"""
DISK_FILLER = """import itertools
for n in itertools.count():
    with open("filler-%d" % n, "wb") as f:
        for _ in range(4):
            f.write(b"x" * 2 ** 20)
"""
ESCAPING_CHILD = """import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open("escaped", "w").close()
        time.sleep(600)
    os._exit(0)
print("left a child behind", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def limited_servers(tmp_path_factory):
    """Servers with a small process and disk limit per run."""
    instance = Servers(tmp_path_factory.mktemp("limited"), VISUALIZER_MAX_RUNS="2",
                       VISUALIZER_RUN_PROCESSES=str(RUN_PROCESSES),
                       VISUALIZER_RUN_DISK_MB=str(RUN_DISK_MB))
    instance.start()
    yield instance
    instance.cleanup()


def run_processes_of(servers, run_dir):
    return [pid for pid, folder in servers.run_pids().items() if folder == str(run_dir)]


@pytest.mark.parametrize("stem, source, message", [
    ("fork_bomb", FORK_BOMB, "process limit of %d exceeded" % RUN_PROCESSES),
    ("disk_filler", DISK_FILLER, "disk limit of %d MB exceeded" % RUN_DISK_MB)])
def test_a_run_over_its_limit_is_failed_with_the_reason_and_leaves_nothing(
        playwright, limited_servers, stem, source, message):
    user = WebUser(playwright, limited_servers, stem + "_user").register_and_login()
    script_id = user.upload_script(stem + ".py", source)
    user.run(script_id)

    status = user.wait_for_state(script_id, ("finished", "failed", "stopped"), 60)
    assert (status["state"], status["message"]) == ("failed", message)
    assert run_processes_of(limited_servers, user.run_dir(script_id, stem)) == []
    assert "failed" in user.get("/scripts/%d" % script_id).text()
    assert limited_servers.process.poll() is None
    if stem == "disk_filler":
        # The run folder is measured at each poll of the runner (0.5 s): a fast writer
        # gets a poll or two of its write speed beyond the limit, not the whole disk.
        written = sum(f.stat().st_size for f in user.run_dir(script_id, stem).glob("filler-*"))
        record_measurement("disk_filler", {"limit_mb": RUN_DISK_MB,
                                           "written_mb": round(written / 2 ** 20)})
        assert written < 2 * 2 ** 30


def test_a_child_that_escaped_its_session_is_ended_by_stop(playwright, limited_servers):
    user = WebUser(playwright, limited_servers, "escaping_user").register_and_login()
    script_id = user.upload_script("escaping.py", ESCAPING_CHILD)
    user.run(script_id)
    folder = user.run_dir(script_id, "escaping")
    wait_for(lambda: (folder / "escaped").exists(), 30, what="the escaped child to start")
    assert len(run_processes_of(limited_servers, folder)) >= 3

    stop = user.post("/scripts/%d/stop" % script_id, form={"csrf_token": user.csrf_token()})
    assert stop.status == 302
    status = user.wait_for_state(script_id, ("finished", "failed", "stopped"), 30)
    assert (status["state"], status["message"]) == ("stopped", "stopped by the user")
    assert run_processes_of(limited_servers, folder) == []


@pytest.mark.slow
def test_a_child_that_escaped_its_session_is_ended_by_server_shutdown(playwright, fresh_servers):
    servers = fresh_servers()
    user = WebUser(playwright, servers, "escaping_shutdown").register_and_login()
    script_id = user.upload_script("escaping_down.py", ESCAPING_CHILD)
    user.run(script_id)
    folder = user.run_dir(script_id, "escaping_down")
    wait_for(lambda: (folder / "escaped").exists(), 30, what="the escaped child to start")

    servers.stop(signal.SIGTERM)
    assert servers.process.returncode == 0
    assert servers.run_pids() == {}
    assert read_status_file(folder)["state"] == "stopped"
