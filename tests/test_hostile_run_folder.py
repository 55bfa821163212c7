"""A run folder is written by the user's script: both servers read it as hostile input.

Mallory (user 1) runs mnist_keras.py; her script may put links, named pipes and huge
files anywhere in her own run folder. Alice (user 2) has a run folder next to hers,
and the installation has files outside the storage folder. Every file the servers
read is tried with every trick: the routes answer 404 or a message, the dashboards
show a message, and no byte of Alice's or of the installation's files is served.
A named pipe would hang a read forever: the timeout marks turn that into a failure.
"""
import io
import json
import os
import pickle
import time

import numpy as np
import pytest
from conftest import (make_test_config, newest_run_folder, png_bytes, run_update,
                      upload_script)

from custom_bokeh import saliency_maps
from custom_bokeh.dashboard import MAX_DRAWN_VALUES, ImageDashboard
from custom_bokeh.training_progress import MAX_TABLE_COLUMNS, TrainingProgressDashboard
from custom_keras import registry, storage
from visualizer import create_app
from visualizer.run_store import apply_run_update

pytestmark = pytest.mark.timeout(60)

ALICE = b"ALICE-PRIVATE-BYTES"
INSTALLATION = b"INSTALLATION-SECRET-KEY"
SALIENCY = registry.get("saliency_maps")


def plant(run, rel_path, trick, outside, alice_run):
    """Puts ``trick`` at ``run/rel_path``; returns the bytes that must never be served.

    Args:
        run: Mallory's run folder.
        rel_path: the file a server reads, relative to the run folder.
        trick: one of TRICKS.
        outside: a folder outside the storage folder holding the installation's secret.
        alice_run: Alice's run folder, holding her copy of every file.
    """
    path = os.path.join(run, rel_path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        os.remove(path)
    if trick == "link outside":
        os.symlink(os.path.join(outside, "secret_key"), path)
    elif trick == "link to another user's file":
        os.symlink(os.path.join(alice_run, rel_path), path)
    elif trick == "link at a middle component":
        top = rel_path.split(os.sep)[0]
        if top == rel_path:  # a file of the run folder itself: the run folder is the link
            os.rename(run, run + ".moved")
            os.symlink(alice_run, run)
        else:
            os.rename(os.path.join(run, top), os.path.join(run, top + ".moved"))
            os.symlink(os.path.relpath(os.path.join(alice_run, top), run), os.path.join(run, top))
    elif trick == "named pipe":
        os.mkfifo(path)
    elif trick == "link to /dev/zero":
        os.symlink("/dev/zero", path)
    else:
        raise ValueError(trick)
    return ALICE if "another user" in trick or "middle" in trick else INSTALLATION


TRICKS = ("link outside", "link to another user's file", "link at a middle component",
          "named pipe", "link to /dev/zero")


def alices_files(alice_run, rel_paths, content=ALICE):
    for rel_path in rel_paths:
        path = os.path.join(alice_run, rel_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)


def sparse_file(path, size):
    """A file of ``size`` bytes that takes no disk space."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        os.remove(path)
    with open(path, "wb") as f:
        f.truncate(size)


# --- the Flask app --------------------------------------------------------------

@pytest.fixture
def mallory(app, client, auth, tmp_path):
    """Mallory's run folder (script 1, with an image), Alice's run folder and the secret."""
    auth.register_and_login("mallory")
    upload_script(client, "mnist_keras.py")
    client.post("/scripts/1/run", data={"images": "new", "image": (io.BytesIO(png_bytes()),
                                                                    "digit.png")},
                content_type="multipart/form-data")
    run = newest_run_folder(app, 1)
    alice_run = os.path.join(app.config["STORAGE_DIR"], "2", "alice", "runs", "9")
    alices_files(alice_run, ["mnist_keras.py", "output.txt", "images/digit.png",
                             "networks/mnist_keras.keras"])
    outside = tmp_path / "instance"
    os.makedirs(outside, exist_ok=True)
    (outside / "secret_key").write_bytes(INSTALLATION)
    return run, alice_run, str(outside)


# (file read, URL, what a refused read answers)
FLASK_READS = [
    ("images/digit.png", "/scripts/1/images/digit.png", 404),
    ("output.txt", "/scripts/1/output/download", 302),
    ("output.txt", "/scripts/1/output", 200),
    ("output.txt", "/scripts/1/output.json", 200),
    ("networks/mnist_keras.keras", "/scripts/1/network", 302),
    ("mnist_keras.py", "/scripts/1", 200),
]


@pytest.mark.parametrize("trick", TRICKS)
@pytest.mark.parametrize("rel_path, url, status", FLASK_READS)
def test_a_route_serves_no_byte_through_a_link_or_special_file(client, mallory, rel_path, url,
                                                               status, trick):
    run, alice_run, outside = mallory
    if rel_path != "mnist_keras.py":  # the other files exist before the trick replaces them
        alices_files(run, [rel_path], b"mallory's own bytes")
    forbidden = plant(run, rel_path, trick, outside, alice_run)
    response = client.get(url)
    assert response.status_code == status
    assert forbidden not in response.data
    if status == 302:  # a download refused: the page it goes back to says why
        page = client.get(response.headers["Location"]).get_data(as_text=True)
        assert ("cannot be downloaded" in page or "has no saved network" in page
                or "has no output" in page)
        assert forbidden.decode() not in page


@pytest.mark.parametrize("trick", ["named pipe", "link to /dev/zero", "link outside"])
def test_the_output_tab_says_why_it_shows_no_output(client, mallory, trick):
    run, alice_run, outside = mallory
    plant(run, "output.txt", trick, outside, alice_run)
    [line] = client.get("/scripts/1/output.json").get_json()["lines"]
    assert line == "[The output cannot be shown: output.txt %s.]" % (
        "is not a regular file" if trick == "named pipe" else "is a link")


@pytest.mark.parametrize("trick", TRICKS)
def test_the_overview_lists_no_image_and_offers_no_network_through_a_trick(client, mallory,
                                                                           trick):
    run, alice_run, outside = mallory
    alices_files(run, ["networks/mnist_keras.keras"], b"mallory's own bytes")
    plant(run, "images/digit.png", trick, outside, alice_run)
    plant(run, "networks/mnist_keras.keras", trick, outside, alice_run)
    page = client.get("/scripts/1").get_data(as_text=True)
    assert "images/digit.png" not in page and "Download network" not in page  # the record names it


def test_the_overview_says_why_it_hides_a_linked_script(client, mallory):
    run, alice_run, outside = mallory
    plant(run, "mnist_keras.py", "link to another user's file", outside, alice_run)
    page = client.get("/scripts/1").get_data(as_text=True)
    assert "The script file is not shown: mnist_keras.py is a link." in page


@pytest.mark.parametrize("rel_path, url, cap", [
    ("output.txt", "/scripts/1/output/download", storage.MAX_DOWNLOAD_BYTES),
    ("networks/mnist_keras.keras", "/scripts/1/network", storage.MAX_DOWNLOAD_BYTES),
    ("images/digit.png", "/scripts/1/images/digit.png", storage.MAX_IMAGE_BYTES),
    ("mnist_keras.py", "/scripts/1", storage.MAX_SCRIPT_BYTES),
])
def test_a_file_over_its_cap_is_refused_with_a_message(client, mallory, rel_path, url, cap):
    run, _, _ = mallory
    sparse_file(os.path.join(run, rel_path), cap + 1)
    response = client.get(url, follow_redirects=True)
    page = response.get_data(as_text=True)
    if rel_path == "images/digit.png":
        assert response.status_code == 404
    else:
        assert "%s is larger than %s" % (os.path.basename(rel_path),
                                         storage.format_bytes(cap)) in page
        assert len(response.data) < 1024 * 1024


def test_downloads_send_the_file_as_it_was_when_opened(client, mallory):
    run, _, _ = mallory
    alices_files(run, ["output.txt"], b"first part\n")
    response = client.get("/scripts/1/output/download", buffered=False)
    with open(os.path.join(run, "output.txt"), "ab") as f:
        f.write(b"written after the download started\n")
    assert b"".join(response.response) == b"first part\n"
    response.close()


def test_a_run_folder_replaced_by_a_link_gives_nothing_to_the_next_run_and_deletes_no_byte(
        app, client, mallory):
    run, alice_run, _ = mallory
    alices_files(alice_run, ["results/history.pickle", "output.txt", "images/digit.png"])
    os.rename(run, run + ".moved")
    os.symlink(alice_run, run)
    apply_run_update(app, run_update(1, "finished", exit_code=0, ended_at=time.time()))
    before = sorted(os.listdir(alice_run))
    page = client.post("/scripts/1/run", data={"images": "keep"}, follow_redirects=True
                       ).get_data(as_text=True)
    assert "There is no previous image to keep" in page  # Alice's image is not taken
    client.post("/scripts/1/run", data={"images": "none"})
    new_run = os.path.join(os.path.dirname(run), "2")
    assert app.extensions["runner"].started[-1] == (2, new_run,
                                                    os.path.join(new_run, "mnist_keras.py"))
    assert os.listdir(os.path.join(new_run, "images")) == []
    apply_run_update(app, run_update(2, "finished", exit_code=0, ended_at=time.time()))
    client.post("/scripts/1/runs/1/delete")
    assert not os.path.lexists(run) and sorted(os.listdir(alice_run)) == before


# --- storage --------------------------------------------------------------------

def test_open_run_file_refuses_a_link_at_every_component(tmp_path):
    run = tmp_path / "1" / "run"
    os.makedirs(run / "results" / "history" / "saliency_maps")
    os.makedirs(tmp_path / "2" / "alice" / "results" / "history" / "saliency_maps")
    (tmp_path / "2" / "alice" / "results" / "history" / "saliency_maps" / "index.jsonl"
     ).write_bytes(ALICE)
    index = os.path.join("results", "history", "saliency_maps", "index.jsonl")
    for link in ("results", os.path.join("results", "history"),
                 os.path.join("results", "history", "saliency_maps"), index):
        moved = str(run / link) + ".moved"
        os.rename(run / link, moved) if os.path.lexists(run / link) else None
        os.symlink(tmp_path / "2" / "alice" / link, run / link)
        with pytest.raises(storage.UnsafeFileError, match="is a link"):
            storage.read_run_file(str(run), index, storage.MAX_LINES_BYTES)
        os.remove(run / link)
        if os.path.lexists(moved):
            os.rename(moved, run / link)


def test_a_named_pipe_where_a_folder_should_be_is_refused(tmp_path):
    os.makedirs(tmp_path / "run")
    os.mkfifo(tmp_path / "run" / "results")
    os.mkfifo(tmp_path / "run" / "images")
    with pytest.raises(storage.UnsafeFileError, match="results is a link or not a folder"):
        storage.read_complete_lines(str(tmp_path / "run"), "results/training_progress.tsv")
    assert storage.list_images(str(tmp_path / "run")) == []


@pytest.mark.parametrize("path", ["../2/alice/output.txt", "/etc/passwd", "results/../../x", ""])
def test_open_run_file_refuses_paths_that_leave_the_run_folder(tmp_path, path):
    os.makedirs(tmp_path / "run")
    with pytest.raises(storage.UnsafeFileError, match="not a path inside the run folder"):
        storage.read_run_file(str(tmp_path / "run"), path, 100)


def test_list_images_leaves_out_links_pipes_and_folders(tmp_path):
    images = tmp_path / "run" / "images"
    os.makedirs(images / "folder.png")
    (images / "real.png").write_bytes(b"png")
    os.symlink("/etc/passwd", images / "passwd.png")
    os.symlink("real.png", images / "inside_link.png")
    os.mkfifo(images / "pipe.png")
    assert storage.list_images(str(tmp_path / "run")) == ["real.png"]


def test_an_images_folder_that_is_a_link_lists_nothing(tmp_path):
    os.makedirs(tmp_path / "alice" / "images")
    (tmp_path / "alice" / "images" / "private.png").write_bytes(ALICE)
    os.makedirs(tmp_path / "run")
    os.symlink(tmp_path / "alice" / "images", tmp_path / "run" / "images")
    assert storage.list_images(str(tmp_path / "run")) == []


def test_read_complete_lines_reads_a_big_file_in_capped_steps(tmp_path):
    os.makedirs(tmp_path / "run")
    line = b"x" * 99 + b"\n"
    (tmp_path / "run" / "table.tsv").write_bytes(line * 30000)  # 3 MB
    offset, total, calls = 0, 0, 0
    while True:
        lines, offset = storage.read_complete_lines(str(tmp_path / "run"), "table.tsv", offset)
        if not lines:
            break
        assert len(lines) * 100 <= storage.MAX_LINES_BYTES
        total, calls = total + len(lines), calls + 1
    assert total == 30000 and calls == 3


def test_a_line_longer_than_the_cap_is_refused(tmp_path):
    sparse_file(str(tmp_path / "run" / "index.jsonl"), storage.MAX_LINES_BYTES + 10)
    with pytest.raises(storage.FileTooLargeError, match="a line longer than 1 MB"):
        storage.read_complete_lines(str(tmp_path / "run"), "index.jsonl")


@pytest.mark.parametrize("trick", TRICKS)
def test_a_run_status_through_a_trick_reads_as_none(tmp_path, trick):
    run, alice_run = str(tmp_path / "1" / "run"), str(tmp_path / "2" / "alice")
    os.makedirs(run)
    storage.write_run_status(alice_run, "finished", 0)
    os.makedirs(tmp_path / "instance")
    (tmp_path / "instance" / "secret_key").write_bytes(b'{"state": "finished"}')
    plant(run, storage.STATUS_FILE, trick, str(tmp_path / "instance"), alice_run)
    if "middle" in trick:  # the run folder itself is the link
        with pytest.raises(storage.UnsafeFileError):
            storage.read_run_file(run, storage.STATUS_FILE, storage.MAX_STATUS_BYTES)
    assert storage.read_run_status(run) is None


def test_a_run_status_over_its_cap_reads_as_none(tmp_path):
    run = str(tmp_path / "run")
    storage.write_run_status(run, "finished", 0)
    with open(os.path.join(run, storage.STATUS_FILE), "ab") as f:
        f.write(b" " * storage.MAX_STATUS_BYTES)
    assert storage.read_run_status(run) is None


def test_disk_usage_follows_no_link_and_counts_sparse_files_whole(tmp_path):
    folder = tmp_path / "user"
    os.makedirs(folder / "run")
    (folder / "run" / "data").write_bytes(b"x" * 10000)
    os.link(folder / "run" / "data", folder / "run" / "hard_link")  # counted once
    sparse_file(str(folder / "run" / "sparse"), 5 * storage.MIB)
    os.makedirs(tmp_path / "elsewhere")
    sparse_file(str(tmp_path / "elsewhere" / "huge"), 100 * storage.MIB)
    os.symlink(tmp_path / "elsewhere", folder / "run" / "link")
    used = storage.disk_usage(str(folder))
    assert 10000 + 5 * storage.MIB <= used < 5 * storage.MIB + 64 * 1024


# --- the dashboards -------------------------------------------------------------

INDEX = os.path.join("results", "history", "saliency_maps", "index.jsonl")
SNAPSHOT = os.path.join("results", "history", "saliency_maps", "000000000.pickle")
INPUT_IMAGES = os.path.join("results", storage.INPUT_IMAGES_FILE)


def write_saliency_run(run, value):
    storage.write_snapshot(run, SALIENCY.results_file,
                           {"digit.png": np.full((28, 28, 1), value, np.uint8)}, "digit.png",
                           {"stage": 0, "epoch": 0, "batch": 0, "step": 0})
    storage.write_input_images(run, {"digit.png": np.full((28, 28, 1), value, np.uint8)})


@pytest.fixture
def runs(tmp_path):
    """(Mallory's run with a snapshot of 7s, Alice's run with a snapshot of 200s, outside)."""
    run, alice_run = str(tmp_path / "1" / "run"), str(tmp_path / "2" / "alice")
    write_saliency_run(run, 7)
    write_saliency_run(alice_run, 200)
    os.makedirs(tmp_path / "instance")
    (tmp_path / "instance" / "secret_key").write_bytes(INSTALLATION)
    return run, alice_run, str(tmp_path / "instance")


def drawn_values(layout):
    """Every value of every image drawn in the layout (packed RGBA)."""
    from bokeh.models import ImageRGBA, Plot
    values = set()
    for fig in layout.select({"type": Plot}):
        for renderer in fig.renderers:
            if isinstance(renderer.glyph, ImageRGBA):
                for image in renderer.data_source.data["image"]:
                    values |= set(np.unique(np.asarray(image).view(np.uint8)).tolist())
    return values


@pytest.mark.parametrize("trick", TRICKS)
@pytest.mark.parametrize("rel_path", [INDEX, SNAPSHOT, INPUT_IMAGES])
def test_an_image_dashboard_shows_a_message_and_no_foreign_data(runs, rel_path, trick):
    run, alice_run, outside = runs
    plant(run, rel_path, trick, outside, alice_run)
    dashboard = ImageDashboard(run, SALIENCY, saliency_maps.render)
    assert dashboard.message.visible
    assert 200 not in drawn_values(dashboard.layout)  # nothing of Alice's
    if rel_path == INDEX and "middle" not in trick:
        assert "Could not read the history of snapshots: index.jsonl" in dashboard.message.text
    elif "middle" not in trick:
        assert dashboard.message.text.startswith("Refused to read a results file: ")
        assert ("is a link" in dashboard.message.text
                or "is not a regular file" in dashboard.message.text)
    else:
        assert "results is a link or not a folder" in dashboard.message.text


def test_the_results_folder_linked_to_another_users_results_shows_nothing_of_hers(runs):
    run, alice_run, _ = runs
    os.rename(os.path.join(run, "results"), os.path.join(run, "results.moved"))
    os.symlink(os.path.join("..", "..", "2", "alice", "results"), os.path.join(run, "results"))
    dashboard = ImageDashboard(run, SALIENCY, saliency_maps.render)
    assert dashboard.entries == [] and drawn_values(dashboard.layout) == set()
    assert dashboard.message.text == ("Could not read the history of snapshots: results is a "
                                      "link or not a folder")


@pytest.mark.parametrize("rel_path, cap", [(SNAPSHOT, storage.MAX_RESULT_BYTES),
                                           (INPUT_IMAGES, storage.MAX_INPUT_IMAGES_BYTES)])
def test_an_image_dashboard_refuses_a_results_file_over_its_cap(runs, rel_path, cap):
    run, _, _ = runs
    sparse_file(os.path.join(run, rel_path), cap + 1)
    dashboard = ImageDashboard(run, SALIENCY, saliency_maps.render)
    assert dashboard.message.text == "Refused to read a results file: %s is larger than %s" % (
        os.path.basename(rel_path), storage.format_bytes(cap))


def test_a_result_too_large_to_draw_is_reported_not_drawn(tmp_path):
    run = str(tmp_path / "run")
    storage.write_snapshot(run, SALIENCY.results_file,
                           {"digit.png": np.zeros((4000, 4000, 1), np.uint8)}, "digit.png",
                           {"stage": 0, "epoch": 0, "batch": 0, "step": 0})
    dashboard = ImageDashboard(run, SALIENCY, saliency_maps.render)
    assert dashboard.message.text == (
        "The saliency maps of image digit.png is not drawn: it holds 16000000 array values; "
        "the dashboards draw at most %d." % MAX_DRAWN_VALUES)
    assert drawn_values(dashboard.layout) == set()


def test_a_snapshot_that_references_itself_is_reported(tmp_path):
    run = str(tmp_path / "run")
    endless = []
    endless.append(endless)
    storage.write_snapshot(run, SALIENCY.results_file, {"digit.png": endless}, "digit.png",
                           {"stage": 0, "epoch": 0, "batch": 0, "step": 0})
    dashboard = ImageDashboard(run, SALIENCY, saliency_maps.render)
    assert "is not drawn: it holds more than" in dashboard.message.text


def test_a_snapshot_that_is_not_a_dict_is_reported(tmp_path):
    run = str(tmp_path / "run")
    write_saliency_run(run, 7)
    storage.atomic_write_pickle(os.path.join(run, SNAPSHOT), [1, 2, 3])
    dashboard = ImageDashboard(run, SALIENCY, saliency_maps.render)
    assert dashboard.message.text == ("Could not read 000000000.pickle: a snapshot must be a "
                                      "dict with a dict of images")


@pytest.mark.parametrize("data, error", [
    # an allowed callable with crafted arguments
    (b"cbuiltins\ncomplex\n(I1\nS'y'\ntR.", "not a well-formed results pickle: TypeError: "),
    (b"\x80\x05\x95", "pickle data was truncated"),
])
def test_a_malformed_snapshot_is_reported_and_not_read_again(tmp_path, monkeypatch, data, error):
    run = str(tmp_path / "run")
    write_saliency_run(run, 7)
    storage.atomic_write_bytes(os.path.join(run, SNAPSHOT), data)
    with pytest.raises(pickle.UnpicklingError, match=error):
        storage.read_snapshot(run, SALIENCY.results_file, {"file": "000000000.pickle"})
    dashboard = ImageDashboard(run, SALIENCY, saliency_maps.render)
    assert dashboard.message.text.startswith("Could not read 000000000.pickle: " + error)
    reads = []
    monkeypatch.setattr(storage, "read_snapshot", lambda *args: reads.append(args))
    dashboard.update()
    assert reads == [] and error in dashboard.message.text


@pytest.mark.parametrize("line", [b"not json", b"[" * 100_000])
def test_a_garbled_history_index_is_reported(tmp_path, line):
    run = str(tmp_path / "run")
    write_saliency_run(run, 7)
    with open(os.path.join(run, INDEX), "ab") as f:
        f.write(line + b"\n")
    dashboard = ImageDashboard(run, SALIENCY, saliency_maps.render)
    assert dashboard.message.text.startswith("Could not read the history of snapshots: ")


TABLE = os.path.join("results", "training_progress.tsv")


@pytest.fixture
def progress_runs(tmp_path):
    run, alice_run = str(tmp_path / "1" / "run"), str(tmp_path / "2" / "alice")
    for folder, value in ((run, 0.5), (alice_run, 0.25)):
        storage.append_rows(os.path.join(folder, TABLE), ["progress", "epoch", "batch", "loss"],
                            [[0.1, 0, 1, value]])
    os.makedirs(tmp_path / "instance")
    (tmp_path / "instance" / "secret_key").write_bytes(b"progress\tloss\n0.1\t0.125\n")
    return run, alice_run, str(tmp_path / "instance")


@pytest.mark.parametrize("trick", TRICKS)
def test_the_training_progress_dashboard_reads_no_table_through_a_trick(progress_runs, trick):
    run, alice_run, outside = progress_runs
    plant(run, TABLE, trick, outside, alice_run)
    dashboard = TrainingProgressDashboard(run)
    assert dashboard.batch_source.data.get("loss", []) == []
    assert dashboard.message.text.startswith("Could not read the training progress: ")


def test_a_table_line_longer_than_the_cap_is_reported(progress_runs):
    run, _, _ = progress_runs
    sparse_file(os.path.join(run, TABLE), storage.MAX_LINES_BYTES + 1)
    dashboard = TrainingProgressDashboard(run)
    assert dashboard.message.text == ("Could not read the training progress: "
                                      "training_progress.tsv has a line longer than 1 MB")


def test_a_table_with_too_many_columns_is_reported(tmp_path):
    run = str(tmp_path / "run")
    columns = ["progress"] + ["m%d" % i for i in range(MAX_TABLE_COLUMNS)]
    storage.append_rows(os.path.join(run, TABLE), columns, [[0.0] * len(columns)])
    dashboard = TrainingProgressDashboard(run)
    assert dashboard.message.text == (
        "Could not read the training progress: training_progress.tsv has %d columns; the "
        "dashboard draws at most %d" % (len(columns), MAX_TABLE_COLUMNS))


def test_a_table_is_drawn_up_to_its_row_cap(tmp_path, monkeypatch):
    from custom_bokeh import training_progress
    monkeypatch.setattr(training_progress, "MAX_TABLE_ROWS", 5)
    run = str(tmp_path / "run")
    storage.append_rows(os.path.join(run, TABLE), ["progress", "epoch", "batch", "loss"],
                        [[i / 10, 0, i, 1.0] for i in range(8)])
    dashboard = TrainingProgressDashboard(run)
    storage.append_rows(os.path.join(run, TABLE), [], [[0.9, 0, 9, 1.0]])
    dashboard.update()
    assert dashboard.batch_source.data["batch"] == [0, 1, 2, 3, 4]
    assert dashboard.message.text == ("Showing the first 5 rows of training_progress.tsv; later "
                                      "rows are not drawn.")


# --- quotas ---------------------------------------------------------------------

@pytest.fixture
def quota_app(tmp_path):
    return create_app(make_test_config(tmp_path, USER_MAX_SCRIPTS=2, USER_STORAGE_MB=1))


def storage_listing(app):
    found = []
    for folder, _, files in os.walk(app.config["STORAGE_DIR"]):
        found += [os.path.join(folder, name) for name in files]
    return sorted(found)


def scripts_of(app):
    from visualizer.models import Script
    with app.app_context():
        return sorted(s.filename for s in Script.query.all())


def login(client):
    client.post("/auth/register", data={"username": "mallory", "password": "password123",
                                        "confirm": "password123"})
    client.post("/auth/login", data={"username": "mallory", "password": "password123"})


def test_an_upload_over_the_number_of_files_is_refused_and_writes_nothing(quota_app):
    client = quota_app.test_client()
    login(client)
    upload_script(client, "a.py")
    upload_script(client, "b.py")
    before = storage_listing(quota_app)
    response = upload_script(client, "c.py")
    assert response.status_code == 400
    assert ("You have 2 files, the most one account may keep. Delete a file before uploading "
            "another.") in response.get_data(as_text=True)
    assert storage_listing(quota_app) == before and scripts_of(quota_app) == ["a.py", "b.py"]


def test_an_upload_over_the_storage_is_refused_and_writes_nothing(quota_app):
    client = quota_app.test_client()
    login(client)
    upload_script(client, "a.py")
    before = storage_listing(quota_app)
    used = storage.disk_usage(os.path.join(quota_app.config["STORAGE_DIR"], "1"))
    response = upload_script(client, "big.py", "x = 1\n" * 200_000)  # 1.2 MB
    assert response.status_code == 400
    assert ("Your storage is full: your files use %s of your 1 MB. Delete files or their "
            "results to make room." % storage.format_bytes(used)) in response.get_data(
        as_text=True)
    assert storage_listing(quota_app) == before and scripts_of(quota_app) == ["a.py"]


def test_quotas_count_every_kept_run_and_a_run_over_the_storage_is_refused(quota_app):
    client = quota_app.test_client()
    login(client)
    upload_script(client, "a.py")
    for run_id in (1, 2):  # two kept runs, each with 0.5 MB of results
        client.post("/scripts/1/run", data={"images": "none"})
        alices_files(newest_run_folder(quota_app, 1), ["output.txt", "results/old.pickle"],
                     b"previous run")
        with open(os.path.join(newest_run_folder(quota_app, 1), "data.bin"), "wb") as f:
            f.write(os.urandom(500 * storage.KIB))
        quota_app.extensions["runner"].started.clear()
        apply_run_update(quota_app, run_update(run_id, "finished", exit_code=0))
    before = storage_listing(quota_app)
    used = storage.disk_usage(os.path.join(quota_app.config["STORAGE_DIR"], "1"))
    assert used > storage.MIB  # both runs count
    response = client.post("/scripts/1/run", data={"images": "new", "image": (
        io.BytesIO(png_bytes((200, 200))), "digit.png")}, content_type="multipart/form-data",
        follow_redirects=True)
    assert ("Your storage is full: your files and their runs use %s of your 1 MB, and a run needs "
            "room for its results." % storage.format_bytes(used)) in response.get_data(
        as_text=True)
    assert storage_listing(quota_app) == before
    assert quota_app.extensions["runner"].started == []
    from visualizer.models import Run
    with quota_app.app_context():
        assert Run.query.count() == 2
    client.post("/scripts/1/runs/1/delete")  # deleting a run makes room again
    client.post("/scripts/1/run", data={"images": "none"})
    assert [run[0] for run in quota_app.extensions["runner"].started] == [3]


def test_a_run_is_given_the_storage_left_to_its_user(app, client, auth):
    auth.register_and_login("mallory")
    upload_script(client, "a.py")
    upload_script(client, "b.py")
    with open(os.path.join(newest_run_folder(app, 2), "data.bin"), "wb") as f:
        f.write(os.urandom(3 * storage.MIB))  # a run of another script counts
    client.post("/scripts/1/run", data={"images": "none"})
    others = (storage.disk_usage(os.path.join(app.config["STORAGE_DIR"], "1"))
              - storage.disk_usage(newest_run_folder(app, 1)))
    assert others > 3 * storage.MIB
    assert app.extensions["runner"].disk_limits_mb == {
        2: app.config["USER_STORAGE_MB"] - others / storage.MIB}


def test_quota_settings_come_from_the_environment():
    from visualizer import config
    settings = config.settings_from_env({"VISUALIZER_USER_MAX_SCRIPTS": "7",
                                         "VISUALIZER_USER_STORAGE_MB": "512"})
    assert (settings["USER_MAX_SCRIPTS"], settings["USER_STORAGE_MB"]) == (7, 512)
    defaults = config.settings_from_env({})
    assert (defaults["USER_MAX_SCRIPTS"], defaults["USER_STORAGE_MB"]) == (100, 10240)


def test_history_index_entries_cannot_name_another_folder(runs):
    run, alice_run, _ = runs
    entry = {"stage": 1, "epoch": 0, "batch": 1, "step": 1,
             "file": "../../../../2/alice/results/history/saliency_maps/000000000.pickle"}
    with open(os.path.join(run, INDEX), "a") as f:
        f.write(json.dumps(entry) + "\n")
    dashboard = ImageDashboard(run, SALIENCY, saliency_maps.render)
    assert 200 not in drawn_values(dashboard.layout)
    assert 7 in drawn_values(dashboard.layout)  # the basename names Mallory's own snapshot
