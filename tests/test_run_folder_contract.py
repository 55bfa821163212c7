"""The run-folder contract (custom_keras.storage) that the web app, the Bokeh server and
the callbacks share."""
import os

import pytest

from custom_bokeh.__main__ import parse_args
from custom_keras import storage
from visualizer.config import settings_from_env

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_storage_folder_is_visualizer_storage_else_user_storage_in_the_repository(tmp_path):
    assert storage.storage_dir_from_env({}) == os.path.join(REPOSITORY_ROOT, "user_storage")
    assert storage.storage_dir_from_env({"VISUALIZER_STORAGE": str(tmp_path)}) == str(tmp_path)


def test_the_web_app_and_the_bokeh_server_use_the_same_storage_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("VISUALIZER_STORAGE", raising=False)
    assert parse_args([]).storage_dir == settings_from_env({})["STORAGE_DIR"]
    monkeypatch.setenv("VISUALIZER_STORAGE", str(tmp_path))
    assert parse_args([]).storage_dir == settings_from_env()["STORAGE_DIR"] == str(tmp_path)


def test_a_runs_folder_is_named_by_its_id_below_its_scripts_folder_in_its_users_folder(tmp_path):
    rel_dir = storage.run_rel_dir(3, "mnist_digits.py", 17)

    assert rel_dir == "3/mnist_digits/runs/17"
    assert storage.script_rel_dir(3, "mnist_digits.py") == "3/mnist_digits"
    storage.check_run_rel_dir(3, rel_dir)
    assert storage.run_dir_in(str(tmp_path), rel_dir) == os.path.join(
        storage.user_dir(str(tmp_path), 3), "mnist_digits", "runs", "17")


@pytest.mark.parametrize("rel_dir", ["4/mnist_digits/runs/1", "3/mnist_digits", "3",
                                     "3/../runs/1", "3/./runs/1", "3//runs/1",
                                     "3/a/other/1", "3/a/runs/", "3/a/runs/x", "3/a/runs/-1",
                                     "3/a/runs/\u0661", "3/a/runs/1/results", "3/a\\b/runs/1",
                                     None])
def test_a_run_folder_that_is_not_a_run_of_the_users_own_scripts_is_refused(rel_dir):
    with pytest.raises(ValueError, match="<user_id>/<script>/runs/<run_id>"):
        storage.check_run_rel_dir(3, rel_dir)


def test_the_run_states_are_queued_running_and_three_ends():
    assert storage.RUN_ACTIVE_STATES == ("queued", "running")
    assert set(storage.RUN_ENDED_STATES) == {"finished", "failed", "stopped"}


def test_the_kept_networks_are_listed_by_epoch_without_links_or_strangers(tmp_path):
    run_dir = str(tmp_path / "run")
    epochs = os.path.join(run_dir, storage.NETWORKS_DIR, storage.NETWORK_EPOCHS_DIR)
    os.makedirs(epochs)
    for name in ("train-epoch-10.keras", "train-epoch-2.keras", "train-epoch-0.keras",
                 "other-epoch-1.keras", "train-epoch-3.keras.tmp"):
        open(os.path.join(epochs, name), "w").close()
    os.symlink("/etc/hostname", os.path.join(epochs, "train-epoch-4.keras"))
    assert storage.list_network_epochs(run_dir, "train") == [2, 10]
    assert storage.network_epoch_file("train", 2) == os.path.join(
        storage.NETWORKS_DIR, storage.NETWORK_EPOCHS_DIR, "train-epoch-2.keras")


def test_a_link_in_place_of_the_kept_networks_folder_lists_nothing(tmp_path):
    run_dir = str(tmp_path / "run")
    real = tmp_path / "elsewhere"
    real.mkdir()
    (real / "train-epoch-1.keras").write_bytes(b"x")
    os.makedirs(os.path.join(run_dir, storage.NETWORKS_DIR))
    os.symlink(real, os.path.join(run_dir, storage.NETWORKS_DIR, storage.NETWORK_EPOCHS_DIR))
    assert storage.list_network_epochs(run_dir, "train") == []
