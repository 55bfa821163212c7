"""Run and stop (with a fake runner), every run kept with its own folder, the run list and
the ?run= choice on every tab, the Output tab and its JSON, images, technique tabs, the
ended-run banner and reconciling runs at start."""
import datetime
import hashlib
import io
import json
import os
import time

import pytest
from conftest import (DiskFullWhileWriting, FakeRunner, make_test_config, newest_run_folder,
                      png_bytes, run_update, script_folder, upload_script)
from markupsafe import escape
from PIL import Image

from custom_keras import registry, storage
from visualizer import create_app
from visualizer import runs as runs_module
from visualizer.models import Run, Script, db
from visualizer.run_store import apply_run_update
from visualizer.runs import tail_lines


@pytest.fixture
def script(app, client, auth):
    """Alice is logged in and has uploaded mnist_keras.py (script id 1); its folder."""
    auth.register_and_login()
    upload_script(client, "mnist_keras.py")
    return script_folder(app, 1)


@pytest.fixture
def run_dir(app, script):
    """The folder of a finished run 1 of Alice's mnist_keras.py, for tests to write into."""
    return newest_run_folder(app, 1)


def post_run(client, images=(), choice="new", script_id=1):
    data = {"images": choice, "image": [(io.BytesIO(d), n) for n, d in images]}
    return client.post("/scripts/%d/run" % script_id, data=data,
                       content_type="multipart/form-data", follow_redirects=True)


def runs(app):
    with app.app_context():
        return [(r.id, r.state) for r in Run.query.order_by(Run.id)]


def run_path(script, run_id, *names):
    """A path in the folder of run ``run_id`` of the script whose folder is ``script``."""
    return os.path.join(script, storage.RUNS_DIR, str(run_id), *names)


def finish(app, run_id, **fields):
    apply_run_update(app, run_update(run_id, "finished", exit_code=0, started_at=time.time() - 65,
                                     ended_at=time.time(), **fields))


def write_file(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def test_run_makes_a_folder_with_the_script_and_image_and_calls_runner(app, client, script):
    response = post_run(client, [("digit.png", png_bytes())])
    assert "mnist_keras.py was queued to run." in response.get_data(as_text=True)
    assert runs(app) == [(1, "queued")]
    folder = run_path(script, 1)
    assert app.extensions["runner"].started == [
        (1, folder, os.path.join(folder, "mnist_keras.py"))]
    with open(os.path.join(folder, "mnist_keras.py")) as f:
        assert f.read() == "print('hello')\n"  # the script's copy, where __file__ points
    assert os.listdir(os.path.join(folder, "images")) == ["digit.png"]
    assert client.get("/scripts/1/images/digit.png").data == png_bytes()
    with app.app_context():
        run = db.session.get(Run, 1)
        assert run.number == 1 and run.images == ["digit.png"]
        assert run.script_sha256 == hashlib.sha256(b"print('hello')\n").hexdigest()


def test_two_runs_of_one_script_keep_two_folders_and_both_results(app, client, script):
    post_run(client, [("a.png", png_bytes()), ("b.png", png_bytes(color=9))])
    write_file(run_path(script, 1, "output.txt"), "first run\n")
    write_file(run_path(script, 1, "networks", "mnist_keras.keras"), b"network 1")
    finish(app, 1)
    page = client.get("/scripts/1").get_data(as_text=True)
    assert 'value="keep" checked' in page and "/scripts/1/images/b.png?run=1" in page
    post_run(client, choice="keep")  # run 2 starts with run 1's images
    write_file(run_path(script, 2, "output.txt"), "second run\n")
    finish(app, 2)
    assert runs(app) == [(1, "finished"), (2, "finished")]
    assert storage.list_images(run_path(script, 2)) == ["a.png", "b.png"]
    assert sorted(os.listdir(os.path.join(script, "runs"))) == ["1", "2"]
    assert client.get("/scripts/1/output.json").get_json()["lines"] == ["second run"]
    assert client.get("/scripts/1/output.json?run=1").get_json()["lines"] == ["first run"]
    assert client.get("/scripts/1/network?run=1").data == b"network 1"
    response = client.get("/scripts/1/network", follow_redirects=True)  # run 2 saved none
    assert "mnist_keras.py has no saved network yet" in response.get_data(as_text=True)


def test_the_run_list_shows_every_run_newest_first_with_its_hash_and_results(app, client, script):
    post_run(client, choice="none")
    write_file(run_path(script, 1, "results", storage.TRAINING_PROGRESS_TABLE),
               "progress\tepoch\tbatch\tloss\tloss_avg\n1.0\t0\t10\t0.75\t0.8\n")
    write_file(run_path(script, 1, "results", storage.ALERTS_FILE),
               json.dumps({"kind": "nan_loss", "message": "NaN"}) + "\n")
    finish(app, 1)
    post_run(client, choice="none")
    with app.app_context():
        first = db.session.get(Run, 1)
        assert first.final_metrics == {"loss": 0.75} and first.alert_count == 1
        assert (first.ended_at - first.started_at).total_seconds() == pytest.approx(65, abs=1)
    page = client.get("/scripts/1").get_data(as_text=True)
    rows = page.split('<table class="runs-table">')[1].split("</table>")[0].split("<tr")[2:]
    assert 'href="/scripts/1?run=2">2</a>' in rows[0] and "Queued" in rows[0]
    assert 'href="/scripts/1?run=1">1</a>' in rows[1] and "Finished" in rows[1]
    short = hashlib.sha256(b"print('hello')\n").hexdigest()[:10]
    assert rows[0].count(">%s</code>" % short) == rows[1].count(">%s</code>" % short) == 1
    assert "hash-changed" not in page
    assert '<span class="metric">loss 0.75</span>' in rows[1] and "1 min 05 s" in rows[1]
    assert 'href="/scripts/1?run=1#alerts">1</a>' in rows[1]
    assert "/scripts/1/runs/1/delete" in rows[1]
    assert "/scripts/1/runs/2/delete" not in rows[0]  # an active run cannot be deleted


def test_a_changed_script_shows_a_different_hash(app, client, script):
    post_run(client, choice="none")
    finish(app, 1)
    response = client.post("/scripts/1/source", data={"file": (io.BytesIO(
        b"print('changed')\n"), "mnist_keras_v2.py")}, content_type="multipart/form-data",
        follow_redirects=True)
    assert "mnist_keras.py was replaced by the new version; its next run runs it." in (
        response.get_data(as_text=True))
    post_run(client, choice="none")
    page = client.get("/scripts/1").get_data(as_text=True)
    new_hash = hashlib.sha256(b"print('changed')\n").hexdigest()
    assert 'class="hash hash-changed" title="sha256 %s' % new_hash in page
    assert page.count("hash-changed") == 1  # only run 2 differs from the run before it
    with open(run_path(script, 1, "mnist_keras.py")) as f:
        assert f.read() == "print('hello')\n"  # run 1 keeps the script it ran
    code = '<span class="s1">\'changed\'</span>'  # as the Overview highlights it
    assert code in client.get("/scripts/1").get_data(as_text=True)
    assert code not in client.get("/scripts/1?run=1").get_data(as_text=True)


def test_the_chosen_run_is_shown_on_every_tab_and_kept_in_the_tab_links(app, client, script):
    post_run(client, [("one.png", png_bytes())])
    write_file(run_path(script, 1, "output.txt"), "output of run 1\n")
    finish(app, 1)
    post_run(client, [("two.png", png_bytes())])
    assert "output of run 1" in client.get("/scripts/1/output?run=1").get_data(as_text=True)
    assert "output of run 1" not in client.get("/scripts/1/output").get_data(as_text=True)
    assert client.get("/scripts/1/status.json?run=1").get_json()["state"] == "finished"
    assert client.get("/scripts/1/status.json").get_json()["state"] == "queued"
    assert client.get("/scripts/1/images/one.png?run=1").status_code == 200
    assert client.get("/scripts/1/images/one.png").status_code == 404
    page = client.get("/scripts/1/techniques/saliency_maps?run=1").get_data(as_text=True)
    for tab in ["/scripts/1?run=1", "/scripts/1/output?run=1"] + [
            "/scripts/1/techniques/%s?run=1" % t.key for t in registry.TECHNIQUES
            if t.shows_tab(None)]:
        assert 'href="%s"' % tab in page
    assert 'data-status-url="/scripts/1/status.json?run=1"' in page
    overview = client.get("/scripts/1?run=1").get_data(as_text=True)
    assert "run 1</span>" in overview and 'class="chosen"' in overview
    assert 'href="/scripts/1/output?run=1"' in overview


def test_a_dashboard_token_names_the_chosen_runs_folder(app, client, script, monkeypatch):
    made = []
    monkeypatch.setattr(runs_module, "embed_script", lambda *args: made.append(args) or "")
    post_run(client, choice="none")
    finish(app, 1)
    post_run(client, choice="none")
    client.get("/scripts/1/techniques/saliency_maps?run=1")
    client.get("/scripts/1/techniques/saliency_maps")
    assert [args[-2:] for args in made] == [(1, "1/mnist_keras/runs/1"),
                                            (1, "1/mnist_keras/runs/2")]


def test_a_run_of_another_users_or_another_script_is_404(app, client, auth, script):
    post_run(client, choice="none")
    upload_script(client, "other.py")
    auth.logout()
    auth.register_and_login("bobby_2")
    upload_script(client, "bobs.py")  # script 3
    for url in ["/scripts/3?run=1", "/scripts/3/output?run=1", "/scripts/3/status.json?run=1",
                "/scripts/3/output.json?run=1", "/scripts/3/alerts.json?run=1",
                "/scripts/3/network?run=1", "/scripts/3/techniques/saliency_maps?run=1",
                "/scripts/1?run=1", "/scripts/3?run=x", "/scripts/3?run=%D9%A1"]:
        assert client.get(url).status_code == 404, url
    assert client.post("/scripts/1/runs/1/delete").status_code == 404
    assert client.post("/scripts/3/runs/1/delete").status_code == 404
    assert os.path.isdir(run_path(script, 1))
    auth.logout()
    auth.login()
    assert client.get("/scripts/2?run=1").status_code == 404  # Alice's, of her other script


def test_deleting_a_run_removes_its_folder_and_row_and_refuses_an_active_one(app, client, script):
    post_run(client, choice="none")
    finish(app, 1)
    post_run(client, choice="none")
    response = client.post("/scripts/1/runs/2/delete", follow_redirects=True)
    assert "Run 2 of mnist_keras.py is queued; stop it before deleting it." in (
        response.get_data(as_text=True))
    assert os.path.isdir(run_path(script, 2))
    response = client.post("/scripts/1/runs/1/delete", follow_redirects=True)
    assert "Run 1 of mnist_keras.py and all its results were deleted." in (
        response.get_data(as_text=True))
    assert runs(app) == [(2, "queued")] and not os.path.exists(run_path(script, 1))
    assert client.get("/scripts/1?run=1").status_code == 404


def test_the_overview_alert_list_is_filled_live_from_alerts_json(app, client, script):
    post_run(client, choice="none")
    apply_run_update(app, run_update(1, "running", pid=5, started_at=time.time()))
    page = client.get("/scripts/1").get_data(as_text=True)
    # an empty, hidden list while the run is active, which app.js fills as alerts come
    assert 'data-alerts-url="/scripts/1/alerts.json"' in page and 'data-count="0"' in page
    alert = {"kind": "nan_loss", "epoch": 0, "batch": 3, "step": 3, "message": "<b>NaN</b>"}
    write_file(run_path(script, 1, "results", storage.ALERTS_FILE), json.dumps(alert) + "\n")
    assert client.get("/scripts/1/status.json").get_json()["alert_count"] == 1
    alerts = client.get("/scripts/1/alerts.json").get_json()
    assert alerts["problem"] == "" and [a["message"] for a in alerts["alerts"]] == ["<b>NaN</b>"]


def test_a_new_version_that_is_not_python_is_refused_and_the_script_kept(app, client, script):
    response = client.post("/scripts/1/source", data={"file": (io.BytesIO(b"\xff\xfe"),
                                                               "new.py")},
                           content_type="multipart/form-data", follow_redirects=True)
    assert "new.py is not a UTF-8 text file" in response.get_data(as_text=True)
    with open(os.path.join(script, "mnist_keras.py")) as f:
        assert f.read() == "print('hello')\n"


def test_run_without_image(app, client, script):
    post_run(client, choice="none")
    assert runs(app) == [(1, "queued")]
    assert os.listdir(run_path(script, 1, "images")) == []


def make_bomb():
    buffer = io.BytesIO()
    Image.new("1", (Image.MAX_IMAGE_PIXELS // 1000 + 1, 1001)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("images, choice, message", [
    ([("digit.png", b"\x89PNG\r\n\x1a\nnot really")], "new", "digit.png is not a readable image"),
    ([("digit.png", png_bytes()[:-20])], "new", "digit.png is not a readable image"),
    ([("digit.exe", png_bytes())], "new", "digit.exe is not an image file name"),
    ([("bomb.png", make_bomb())], "new", "bomb.png has too many pixels"),
    ([], "new", "Choose a visualization image to upload"),
    ([], "keep", "There is no previous image to keep"),
    ([], "maybe", "Choose new image(s), the previous image(s) or no image."),
])
def test_run_refuses_bad_images_and_writes_nothing(app, client, script, images, choice, message):
    response = post_run(client, images, choice)
    assert message in response.get_data(as_text=True)
    assert runs(app) == [] and app.extensions["runner"].started == []
    assert os.listdir(script) == ["mnist_keras.py"]


def test_keeping_images_that_a_run_replaced_with_something_else_is_refused(app, client, script):
    post_run(client, [("digit.png", png_bytes())])
    finish(app, 1)
    write_file(run_path(script, 1, "images", "digit.png"), b"not an image any more")
    response = post_run(client, choice="keep")
    assert "digit.png is not a readable image" in response.get_data(as_text=True)
    assert runs(app) == [(1, "finished")]


def test_a_full_disk_while_writing_a_runs_images_keeps_the_earlier_runs(app, client, script,
                                                                        monkeypatch):
    post_run(client, [("a.png", png_bytes())])
    finish(app, 1)
    monkeypatch.setattr(runs_module, "open", DiskFullWhileWriting, raising=False)
    response = post_run(client, [("c.png", png_bytes(color=1))])
    monkeypatch.undo()
    page = response.get_data(as_text=True)
    assert response.status_code == 200  # redirected to the Overview tab, which says why
    assert ("Could not prepare the run: No space left on device. Nothing was changed; "
            "the earlier runs are kept.") in page
    assert os.listdir(os.path.join(script, "runs")) == ["1"]  # no half-written run folder
    assert runs(app) == [(1, "finished")] and len(app.extensions["runner"].started) == 1


def test_run_with_a_file_where_the_users_folder_should_be_says_so(app, client, script,
                                                                  tmp_path):
    user_folder = os.path.dirname(script)
    os.rename(user_folder, str(tmp_path / "moved"))
    with open(user_folder, "w") as f:
        f.write("not a folder")
    for choice, images in (("none", []), ("new", [("c.png", png_bytes())])):
        response = post_run(client, images, choice)
        assert response.status_code == 200
        assert "Could not prepare the run: Not a directory." in (
            response.get_data(as_text=True))
    assert runs(app) == [] and app.extensions["runner"].started == []
    with open(user_folder) as f:
        assert f.read() == "not a folder"


def test_a_run_is_never_made_where_a_link_points(app, client, script, tmp_path):
    os.makedirs(tmp_path / "elsewhere")
    os.symlink(str(tmp_path / "elsewhere"), os.path.join(script, "runs"))
    response = post_run(client, choice="none")
    assert "The folder of mnist_keras.py was replaced by a link" in response.get_data(as_text=True)
    assert runs(app) == [] and os.listdir(tmp_path / "elsewhere") == []


def test_run_refused_while_running(app, client, script):
    post_run(client, choice="none")
    apply_run_update(app, run_update(1, "running", pid=1234, started_at=time.time()))
    response = post_run(client, choice="none")
    assert "mnist_keras.py is already running." in response.get_data(as_text=True)
    assert runs(app) == [(1, "running")]


def test_runner_failure_marks_run_failed(app, client, script):
    def refuse(*args, **kwargs):
        raise OSError("no slot")
    app.extensions["runner"].start = refuse
    response = post_run(client, choice="none")
    assert "could not be started: no slot" in response.get_data(as_text=True)
    assert runs(app) == [(1, "failed")]


def test_stop_calls_runner(app, client, script):
    response = client.post("/scripts/1/stop", follow_redirects=True)
    assert "mnist_keras.py is not running." in response.get_data(as_text=True)
    post_run(client, choice="none")
    page = client.get("/scripts/1").get_data(as_text=True)
    assert "/scripts/1/stop" in page and 'data-open-dialog="run-dialog"' not in page
    client.post("/scripts/1/stop")
    assert app.extensions["runner"].stopped == [1]


def test_run_update_is_written_and_shown(app, client, script):
    post_run(client, choice="none")
    started = time.time()
    apply_run_update(app, run_update(1, "running", pid=4321, started_at=started))
    assert client.get("/scripts/1/status.json").get_json() == {
        "run": 1, "state": "running", "exit_code": None, "message": None, "alert_count": 0}
    assert '<span class="badge badge-running">Running</span>' in client.get("/").get_data(as_text=True)
    apply_run_update(app, run_update(1, "failed", exit_code=1, started_at=started,
                                     ended_at=started + 5, message="exit code 1"))
    with app.app_context():
        run = db.session.get(Run, 1)
        assert (run.state, run.exit_code, run.pid, run.message) == ("failed", 1, None, "exit code 1")
        assert (run.ended_at - run.started_at).total_seconds() == pytest.approx(5, abs=1e-3)


def test_banner_announces_run_that_ended_elsewhere_until_opened(app, client, script):
    post_run(client, choice="none")
    with app.app_context():  # the user last looked at the script a minute ago
        script_row = db.session.get(Script, 1)
        script_row.seen_at -= datetime.timedelta(minutes=1)
        db.session.commit()
    apply_run_update(app, run_update(1, "finished", exit_code=0, ended_at=time.time() - 30))
    page = client.get("/upload").get_data(as_text=True)
    assert 'class="banner banner-finished"' in page and "mnist_keras.py</a>\n      finished" in page
    client.get("/scripts/1")
    assert "banner-finished" not in client.get("/upload").get_data(as_text=True)


def write_output(folder, text):
    with open(os.path.join(folder, "output.txt"), "w", newline="") as f:
        f.write(text)


def test_output_json_returns_last_50_lines(client, run_dir):
    assert client.get("/scripts/1/output.json").get_json()["lines"] == []
    write_output(run_dir, "".join("line %d\n" % i for i in range(200)))
    data = client.get("/scripts/1/output.json").get_json()
    assert data["lines"] == ["line %d" % i for i in range(150, 200)]
    page = client.get("/scripts/1/output").get_data(as_text=True)
    assert "line 199" in page and "line 149\n" not in page and "Download raw output" in page


def test_tail_lines_reads_the_end_of_a_big_file(tmp_path):
    path = tmp_path / "output.txt"
    row = "x" * 99 + "\n"
    with open(path, "w") as f:
        f.write(row * 30000)  # 3 MB
        f.write("epoch 1/2 [==   ] 10%\repoch 1/2 [=====] 100%\nlast line without newline")
    lines = tail_lines(str(tmp_path))
    assert len(lines) == 50
    assert lines[-2:] == ["epoch 1/2 [=====] 100%", "last line without newline"]
    assert lines[0] == "x" * 99
    with open(path, "w") as f:
        f.write("y" * 1_000_000)  # one huge line: only its end is read
    assert tail_lines(str(tmp_path)) == ["y" * (256 * 1024)]
    assert tail_lines(str(tmp_path / "missing")) == []


def keras_progress_bar(step, steps, metrics, previous_width):
    """One redraw of Keras 3's progress bar (``keras.src.utils.progbar.Progbar``, verbose=1),
    byte for byte as it writes it into a file (compared with Keras 3.15's output): backspaces
    over the previous bar, a carriage return, then the bar with ANSI bold/colour codes."""
    done = 20 * step // steps
    bar = "\x1b[1m%d/%d\x1b[0m " % (step, steps)
    if done:
        bar += "\x1b[32m" + "\u2501" * done + "\x1b[0m"
    bar += "\x1b[37m" + "\u2501" * (20 - done) + "\x1b[0m"
    return "\b" * previous_width + "\r" + bar + " \x1b[1m0s\x1b[0m 10ms/step" + metrics


KERAS_OUTPUT = (
    "Epoch 1/2\n"
    + keras_progress_bar(1, 3, " - accuracy: 0.1000 - loss: 2.0000", 0)
    + keras_progress_bar(2, 3, " - accuracy: 0.1500 - loss: 1.5000", 71)
    + keras_progress_bar(3, 3, " - accuracy: 0.3000 - loss: 0.6667", 71) + "\n"
    + "Epoch 2/2\n"
    + keras_progress_bar(1, 3, " - accuracy: 0.5000 - loss: 0.9000", 0)
    + keras_progress_bar(2, 3, " - accuracy: 0.5500 - loss: 0.8000", 71))  # still training


def test_output_tail_shows_a_keras_progress_bar_as_a_terminal_does(client, run_dir):
    write_output(run_dir, KERAS_OUTPUT)
    expected = ["Epoch 1/2",
                "3/3 " + "\u2501" * 20 + " 0s 10ms/step - accuracy: 0.3000 - loss: 0.6667",
                "Epoch 2/2",
                # the bar's grey, still-to-do part in a light line: progress without colours
                "2/3 " + "\u2501" * 13 + "\u2500" * 7
                + " 0s 10ms/step - accuracy: 0.5500 - loss: 0.8000"]
    assert client.get("/scripts/1/output.json").get_json()["lines"] == expected
    page = client.get("/scripts/1/output").get_data(as_text=True)
    assert "\n".join(expected) in page and "\x1b" not in page and "\b" not in page
    download = client.get("/scripts/1/output/download")
    assert download.data == KERAS_OUTPUT.encode("utf-8")  # the file as written, codes and all
    clean = client.get("/scripts/1/output/download?clean=1")
    assert clean.data.decode("utf-8") == "\n".join(expected)  # as the tab shows it, all lines
    assert "filename=mnist_keras_output_clean.txt" in clean.headers["Content-Disposition"]


@pytest.mark.parametrize("line, shown", [
    ("\x1b[1mbold\x1b[0m \x1b[38;5;196mred\x1b[m\x1b[2K\x1b[?25l", "bold red"),
    ("abc\b\bX", "aX"),  # a backspace removes the character before it
    ("\b\bstart", "start"),  # at the start of the line it removes nothing
    ("50%\r100%", "100%"),  # a carriage return starts the line again
    ("done\r", "done"),  # also at the end: "\r\n" line ends, a bar not yet redrawn
    ("\x1b]0;window title\x07text\x07", "text"),  # OSC title, a bell
    ("\x1b(Bplain\ttab", "plain\ttab"),
])
def test_terminal_line(line, shown):
    assert runs_module.terminal_line(line) == shown


def test_download_output(client, run_dir):
    response = client.get("/scripts/1/output/download", follow_redirects=True)
    assert "mnist_keras.py has no output yet" in response.get_data(as_text=True)
    write_output(run_dir, "all\nof\nit\n")
    response = client.get("/scripts/1/output/download")
    assert response.data == b"all\nof\nit\n"
    assert "filename=mnist_keras_output.txt" in response.headers["Content-Disposition"]


TRACEBACK_OUTPUT = ("".join("Epoch %d/9\n" % i for i in range(1, 4))
                    + "Traceback (most recent call last):\n"
                    + '  File "mnist_keras.py", line 3, in <module>\n    model.fit(x)\n'
                    + "ValueError: Input 0 of layer <dense> is incompatible\n")


def fail_run(app, output=TRACEBACK_OUTPUT):
    write_output(newest_run_folder(app, 1), output)
    with app.app_context():
        run = db.session.get(Run, 1)
        run.state, run.exit_code, run.message = "failed", 1, "exited with code 1"
        db.session.commit()


def test_a_failed_runs_overview_shows_the_exception_and_links_to_its_traceback(app, client,
                                                                               script):
    fail_run(app)
    page = client.get("/scripts/1").get_data(as_text=True)
    assert str(escape("ValueError: Input 0 of layer <dense> is incompatible")) in page
    assert "The traceback starts at line 4 of the output" in page
    assert 'href="/scripts/1/output?from=4"' in page
    output = client.get("/scripts/1/output?from=4").get_data(as_text=True)
    assert "Lines 4 to 7 of the script" in output
    assert "Traceback (most recent call last):" in output and "Epoch 3/9" not in output
    assert "data-url" not in output  # not the live end: nothing replaces these lines


def test_a_failed_run_without_a_traceback_shows_no_error_line(app, client, script):
    fail_run(app, output="Killed\n")
    page = client.get("/scripts/1").get_data(as_text=True)
    assert "exited with code 1" in page and "The traceback starts" not in page


def test_a_finished_run_shows_no_error_even_with_a_traceback_in_its_output(app, client, run_dir):
    write_output(run_dir, TRACEBACK_OUTPUT)  # e.g. a caught exception the script printed
    assert "The traceback starts" not in client.get("/scripts/1").get_data(as_text=True)


def test_the_run_dialogs_file_input_has_a_label_of_its_own(client, script):
    page = client.get("/scripts/1").get_data(as_text=True)
    assert ('<label class="file-choice">Image file(s) to upload <input type="file" '
            'name="image"') in page


def test_image_route_serves_only_listed_images(client, script):
    assert client.get("/scripts/1/images/digit.png").status_code == 404
    assert client.get("/scripts/1/images/..%2Fmnist_keras.py").status_code == 404


def test_every_technique_has_a_tab_with_an_embedded_session(client, run_dir):
    page = client.get("/scripts/1").get_data(as_text=True)
    for technique in registry.TECHNIQUES:
        tab_link = 'href="/scripts/1/techniques/%s"' % technique.key
        assert (tab_link in page) == (not technique.tab_when_registered), technique.key
        tab = client.get("/scripts/1/techniques/%s" % technique.key).get_data(as_text=True)
        assert technique.title in tab and str(escape(technique.description)) in tab
        assert "http://bokeh.test:5006/%s/autoload.js" % technique.key in tab
        # The dashboard says, live, when it has no data and which callback to register
        # (tests/test_bokeh_*); a static hint beside it would contradict it once data arrive.
        assert "No results yet" not in tab and technique.register_call not in tab
    assert client.get("/scripts/1/techniques/nope").status_code == 404


def test_the_attribution_methods_tab_shows_once_the_run_registers_an_attribution_method(
        client, script):
    comparison = 'href="/scripts/1/techniques/attribution_methods"'
    post_run(client, choice="none")
    storage.write_techniques(run_path(script, 1), {"saliency_maps": {"state": "active"}})
    assert comparison not in client.get("/scripts/1").get_data(as_text=True)
    storage.write_techniques(run_path(script, 1), {"saliency_maps": {"state": "active"},
                                                   "grad_cam": {"state": "active"}})
    for page in ("/scripts/1", "/scripts/1/output", "/scripts/1/techniques/grad_cam"):
        assert comparison in client.get(page).get_data(as_text=True), page


def test_create_app_reconciles_open_runs(tmp_path):
    config = make_test_config(tmp_path)
    app = create_app(config)
    with app.app_context():
        from visualizer.models import User
        user = User(username="alice_1", password_hash="x")
        script = Script(user=user, filename="train.py")
        db.session.add_all([Run(script=script, state="running", pid=77),
                            Run(script=script, state="finished"), Run(script=script, state="queued")])
        db.session.commit()
    runner = FakeRunner([run_update(1, "failed", message="the process vanished")])
    app = create_app(dict(config, RUNNER=runner))
    folder = os.path.join(config["STORAGE_DIR"], "1", "train", "runs")
    assert runner.reconciled == [
        [(1, "running", 77, os.path.join(folder, "1"), os.path.join(folder, "1", "train.py")),
         (3, "queued", None, os.path.join(folder, "3"), os.path.join(folder, "3", "train.py"))]]
    assert runs(app) == [(1, "failed"), (2, "finished"), (3, "queued")]


def test_real_runner_runs_and_stops_a_script(tmp_path):
    """The LocalRunner built by create_app writes its state changes into the database."""
    app = create_app(make_test_config(tmp_path, RUNNER=None))
    client = app.test_client()
    try:
        client.post("/auth/register", data={"username": "alice_1", "password": "password123",
                                            "confirm": "password123"})
        client.post("/auth/login", data={"username": "alice_1", "password": "password123"})
        upload_script(client, "quick.py", "for i in range(60):\n    print('line', i)\n")
        upload_script(client, "slow.py", "import time\nprint('waiting', flush=True)\ntime.sleep(60)\n")
        for script_id in (1, 2):
            client.post("/scripts/%d/run" % script_id, data={"images": "none"})
        assert wait_for_state(client, 1, ("finished",))["exit_code"] == 0
        assert client.get("/scripts/1/output.json").get_json()["lines"] == [
            "line %d" % i for i in range(10, 60)]
        wait_for_state(client, 2, ("running",))
        client.post("/scripts/2/stop")
        assert wait_for_state(client, 2, ("stopped",))["state"] == "stopped"
    finally:
        app.extensions["runner"].shutdown(stop_runs=True)


def wait_for_state(client, script_id, states, limit_s=60):
    deadline = time.time() + limit_s
    while True:
        status = client.get("/scripts/%d/status.json" % script_id).get_json()
        if status["state"] in states or time.time() > deadline:
            return status
        time.sleep(0.1)
