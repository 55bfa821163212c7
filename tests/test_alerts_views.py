"""Health-check alerts and the run summary on the file list and the Overview tab."""
import json
import os

import pytest
from conftest import newest_run_folder, upload_script

from custom_keras import storage


@pytest.fixture
def user(auth):
    auth.register_and_login()


EXPLODING = {"kind": "exploding_gradients", "epoch": 0, "batch": 12, "step": 12,
             "message": "The largest gradient norm is 4.2e+03 (dense_1).",
             "advice": "Lower the learning rate.", "value": 4200.0, "time": 1.0}
DEAD = {"kind": "dead_units", "epoch": 1, "batch": 3, "step": 50,
        "message": "62% of the units of dense are never active <b>here</b>.",
        "advice": "Use LeakyReLU.", "value": 0.62, "time": 2.0, "layer": "dense"}


def write_alerts(folder, *lines):
    os.makedirs(storage.results_dir(folder), exist_ok=True)
    with open(storage.results_path(folder, storage.ALERTS_FILE), "w") as f:
        f.writelines(line + "\n" for line in lines)


def test_the_file_list_shows_how_many_alerts_each_run_raised(app, client, user):
    upload_script(client, "quiet.py")
    upload_script(client, "noisy.py")
    write_alerts(newest_run_folder(app, 2), json.dumps(EXPLODING), json.dumps(DEAD))
    page = client.get("/").get_data(as_text=True)
    assert page.count("badge-alerts") == 1
    assert ">2 alerts</a>" in page and 'href="/scripts/2#alerts"' in page


def test_overview_lists_every_alert_newest_first_as_text(app, client, user):
    upload_script(client, "noisy.py")
    write_alerts(newest_run_folder(app, 1), json.dumps(EXPLODING), json.dumps(DEAD))
    page = client.get("/scripts/1").get_data(as_text=True)
    assert page.index("dead units") < page.index("exploding gradients")
    assert "Lower the learning rate." in page and "Use LeakyReLU." in page
    assert "<td>2, 3</td>" in page and "<td>1, 12</td>" in page  # epochs counted from 1
    assert "never active &lt;b&gt;here&lt;/b&gt;." in page  # the script wrote it: not HTML
    assert '<dt>Alerts</dt><dd id="alert-count">2</dd>' in page


def test_malformed_alert_lines_are_skipped_and_counted(app, client, user):
    upload_script(client, "noisy.py")
    write_alerts(newest_run_folder(app, 1), "not json", "[1, 2]", '{"kind": 3}', "[" * 100_000,
                 json.dumps(EXPLODING))
    page = client.get("/scripts/1").get_data(as_text=True)
    assert "4 malformed line(s) of alerts.jsonl were skipped." in page
    assert "Lower the learning rate." in page
    assert ">1 alert</a>" in client.get("/").get_data(as_text=True)


def test_a_huge_alerts_file_is_read_only_up_to_its_cap(app, client, user):
    upload_script(client, "noisy.py")
    line = json.dumps(EXPLODING)
    count = storage.MAX_ALERTS_BYTES // (len(line) + 1) + 100
    write_alerts(newest_run_folder(app, 1), *[line] * count)
    page = client.get("/scripts/1").get_data(as_text=True)
    assert "Only the first" in page and "of alerts.jsonl were read." in page
    shown = storage.MAX_ALERTS_BYTES // (len(line) + 1)
    assert '<dt>Alerts</dt><dd id="alert-count">%d</dd>' % shown in page


def test_an_alerts_file_that_is_a_link_is_refused_with_a_message(app, client, user):
    upload_script(client, "noisy.py")
    folder = newest_run_folder(app, 1)
    os.makedirs(storage.results_dir(folder))
    os.symlink("/etc/passwd", storage.results_path(folder, storage.ALERTS_FILE))
    page = client.get("/scripts/1").get_data(as_text=True)
    assert "The alerts could not be read:" in page
    assert client.get("/").status_code == 200


def test_overview_summarises_final_metrics_and_best_validation_epoch(app, client, user):
    upload_script(client, "trained.py")
    folder = newest_run_folder(app, 1)
    os.makedirs(storage.results_dir(folder))
    columns = ["progress", "epoch", "batch", "loss", "accuracy", "loss_avg"]
    table = storage.results_path(folder, storage.TRAINING_PROGRESS_TABLE)
    storage.append_rows(table, columns, [[0.5, 0, 5, 0.9, 0.6, 0.95], [1.0, 0, 10, 0.25, 0.93, 0.5]])
    val_table = storage.results_path(folder, storage.TRAINING_PROGRESS_VAL_TABLE)
    storage.append_rows(val_table, ["epoch", "val_loss", "val_accuracy"],
                        [[1, 0.4, 0.8], [2, 0.3, 0.85], [3, float("nan"), 0.1], [4, 0.35, 0.86]])
    page = client.get("/scripts/1").get_data(as_text=True)
    assert '<span class="metric">loss 0.25</span>, <span class="metric">accuracy 0.93</span>' in page
    assert "loss_avg" not in page
    assert "epoch 2 (val_loss 0.3)" in page
    assert '<dt>Alerts</dt><dd id="alert-count">0</dd>' in page


def test_the_final_row_is_found_at_the_end_of_a_long_table(tmp_path):
    table = storage.results_path(str(tmp_path), storage.TRAINING_PROGRESS_TABLE)
    rows = [[step, step * 0.5] for step in range(200_000)]
    storage.append_rows(table, ["step", "loss"], rows)
    assert os.path.getsize(table) > storage.MAX_LINES_BYTES
    assert storage.read_last_row(str(tmp_path), table) == {"step": 199_999, "loss": 99_999.5}


def test_a_run_without_tables_or_alerts_shows_no_summary(app, client, user):
    upload_script(client, "fresh.py")
    page = client.get("/scripts/1").get_data(as_text=True)
    assert "Best validation" not in page and 'id="alerts"' not in page


def test_a_named_pipe_as_alerts_file_is_refused_without_waiting(app, client, user):
    upload_script(client, "noisy.py")
    folder = newest_run_folder(app, 1)
    os.makedirs(storage.results_dir(folder))
    os.mkfifo(storage.results_path(folder, storage.ALERTS_FILE))
    page = client.get("/scripts/1").get_data(as_text=True)
    assert "The alerts could not be read: alerts.jsonl is not a regular file." in page
    assert "badge-alerts" not in client.get("/").get_data(as_text=True)
