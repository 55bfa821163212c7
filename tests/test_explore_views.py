"""The Explore pages and JSON endpoints with a fake runner: uploads checked before anything is
written, the job's state and results as the page gets them, requests to the job, filter marks
per user and model, and another user's exploration answering 404. The server never imports
keras: the model files here are made by hand (a .keras file is a zip archive)."""
import io
import json
import os
import zipfile

import numpy as np
import pytest
from conftest import FakeRunner, make_test_config, png_bytes, run_update

from custom_keras import storage
from visualizer import create_app, explore
from visualizer.models import Exploration, FilterMark, Run, db
from visualizer.run_store import apply_run_update, exploration_dir, run_folder, run_script_path


def keras_bytes(config=None):
    """A file shaped like a .keras archive (the server checks the shape, the job loads it)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("config.json", json.dumps(config or {"class_name": "Functional"}))
        archive.writestr("metadata.json", json.dumps({"keras_version": "3"}))
        archive.writestr("model.weights.h5", b"\x89HDF" + b"\x00" * 64)
    return buffer.getvalue()


def new_exploration(client, model=None, model_name="net.keras", inputs=None, class_names=None,
                    **fields):
    data = dict(fields)
    if model is not False:
        data["model"] = (io.BytesIO(keras_bytes() if model is None else model), model_name)
    data["inputs"] = inputs if inputs is not None else [(io.BytesIO(png_bytes()), "one.png")]
    if class_names is not None:
        data["class_names"] = class_names
    return client.post("/explore/new", data=data, content_type="multipart/form-data")


@pytest.fixture
def user(auth):
    auth.register_and_login()


def folders(app):
    root = os.path.join(app.config["STORAGE_DIR"], "1")
    return sorted(n for n in os.listdir(root) if n.startswith("explore@")) if os.path.isdir(
        root) else []


def count(app):
    with app.app_context():
        return Exploration.query.count()


def write_result(app, file_name, result, exploration_id=1):
    with app.app_context():
        folder = exploration_dir(app, db.session.get(Exploration, exploration_id))
    storage.atomic_write_json(storage.results_path(folder, file_name), result)
    return folder


def test_an_upload_makes_the_folder_and_row_and_starts_the_job(app, client, user):
    names = io.BytesIO(b"cat\ndog\n\n")
    response = new_exploration(client, class_names=(names, "classes.txt"), name="my net")
    assert response.status_code == 302 and response.headers["Location"] == "/explore/1"
    with app.app_context():
        exploration = db.session.get(Exploration, 1)
        assert (exploration.name, exploration.source) == ("my net", "upload")
        assert json.loads(exploration.class_names) == ["cat", "dog"]
        import hashlib
        assert exploration.model_sha256 == hashlib.sha256(keras_bytes()).hexdigest()
        folder = exploration_dir(app, exploration)
        run = exploration.last_run
        assert run_folder(app, run) == folder and run.script_id is None
        assert run_script_path(app, run) == os.path.join(folder, "explore.py")
    assert folder.endswith(os.path.join("1", "explore@1"))
    assert sorted(os.listdir(folder)) == ["class_names.json", "explore.py",
                                          "explore_settings.json", "images", "model.keras",
                                          "requests"]
    assert os.listdir(os.path.join(folder, "images")) == ["one.png"]
    assert "explore.main(" in open(os.path.join(folder, "explore.py")).read()
    assert json.load(open(os.path.join(folder, "explore_settings.json"))) == {"idle_s": 600}
    assert app.config["RUNNER"].started == [(1, folder, "explore.py")]


@pytest.mark.parametrize("model,model_name,message", [
    (b"print('hi')", "net.keras", "net.keras is not a Keras model file (a .keras file is a zip"),
    (keras_bytes(), "net.h5", "net.h5 is not a Keras model file: choose a .keras file"),
    (False, None, "Choose a .keras model file to upload"),
])
def test_a_model_that_is_not_a_keras_file_is_refused_and_nothing_is_made(
        app, client, user, model, model_name, message):
    response = new_exploration(client, model=model, model_name=model_name)
    assert response.status_code == 400
    assert message in response.get_data(as_text=True)
    assert count(app) == 0 and folders(app) == [] and app.config["RUNNER"].started == []


def test_a_zip_without_the_keras_parts_is_refused(app, client, user):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "hello")
    response = new_exploration(client, model=buffer.getvalue())
    assert response.status_code == 400
    assert "net.keras is a zip archive but not a Keras model: it has no config.json and no " \
           "metadata.json" in response.get_data(as_text=True)
    assert count(app) == 0 and folders(app) == []


def test_a_corrupted_keras_file_is_refused_as_damaged(app, client, user):
    data = bytearray(keras_bytes())
    position = data.index(b"\x89HDF")  # the stored weights: change one byte, the CRC no longer fits
    data[position + 10] ^= 0xFF
    response = new_exploration(client, model=bytes(data))
    assert response.status_code == 400
    assert ("net.keras is a damaged .keras file: its part model.weights.h5 does not match its "
            "checksum") in response.get_data(as_text=True)
    assert count(app) == 0 and folders(app) == []


def test_a_model_over_the_size_cap_is_refused_before_anything_is_written(tmp_path):
    app = create_app(make_test_config(tmp_path, EXPLORE_MODEL_MB=0.001))
    client = app.test_client()
    from conftest import AuthActions
    AuthActions(client).register_and_login()
    response = new_exploration(client, model=keras_bytes() + b"\x00" * 2048)
    assert response.status_code == 400
    assert "larger than the limit of 1 KB for a model" in response.get_data(as_text=True)
    assert count(app) == 0 and folders(app) == []


@pytest.mark.parametrize("inputs,message", [
    ([], "Choose one or more images (PNG or JPEG), or an .npy array file"),
    ([(io.BytesIO(b"not an image"), "a.png")], "a.png is not a readable image"),
    ([(io.BytesIO(b"\x93NUMPY garbage"), "x.npy")], "x.npy is not a NumPy array file"),
    ([(io.BytesIO(png_bytes()), "a.png"), (io.BytesIO(b""), "x.npy")],
     "Give either images or one .npy array file, not both"),
])
def test_bad_inputs_are_refused_and_nothing_is_made(app, client, user, inputs, message):
    response = new_exploration(client, inputs=inputs)
    assert response.status_code == 400 and message in response.get_data(as_text=True)
    assert count(app) == 0 and folders(app) == []


def test_an_array_of_objects_is_refused(app, client, user):
    buffer = io.BytesIO()
    np.save(buffer, np.array(["a", "b"]))
    response = new_exploration(client, inputs=[(io.BytesIO(buffer.getvalue()), "x.npy")])
    assert response.status_code == 400
    assert "x.npy must hold a non-empty array of numbers" in response.get_data(as_text=True)


def test_an_array_of_samples_is_kept_as_inputs_npy(app, client, user):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((3, 28, 28, 1), np.float32))
    assert new_exploration(client, inputs=[(io.BytesIO(buffer.getvalue()), "x.npy")]
                           ).status_code == 302
    with app.app_context():
        folder = exploration_dir(app, db.session.get(Exploration, 1))
    assert np.load(os.path.join(folder, "inputs.npy")).shape == (3, 28, 28, 1)


@pytest.mark.parametrize("data,name,message", [
    (b'{"a": 1}', "c.json", "c.json must hold a JSON list of strings"),
    (b"[1, 2", "c.json", "c.json is not JSON"),
    (b"\xff\xfe", "c.txt", "c.txt is not a UTF-8 text file"),
    (b"\n\n", "c.txt", "c.txt holds no class names"),
    (b"a\nb", "c.csv", "c.csv is neither a .txt file"),
])
def test_bad_class_name_files_are_refused(app, client, user, data, name, message):
    response = new_exploration(client, class_names=(io.BytesIO(data), name))
    assert response.status_code == 400 and message in response.get_data(as_text=True)
    assert count(app) == 0 and folders(app) == []


def test_an_upload_over_the_storage_quota_is_refused(tmp_path):
    app = create_app(make_test_config(tmp_path, USER_STORAGE_MB=0.0001))
    client = app.test_client()
    from conftest import AuthActions
    AuthActions(client).register_and_login()
    response = new_exploration(client)
    assert response.status_code == 400
    assert "Your storage is full" in response.get_data(as_text=True)
    assert count(app) == 0 and folders(app) == []


def test_explorations_count_against_the_number_a_user_may_keep(tmp_path):
    app = create_app(make_test_config(tmp_path, USER_MAX_SCRIPTS=1))
    client = app.test_client()
    from conftest import AuthActions
    AuthActions(client).register_and_login()
    assert new_exploration(client).status_code == 302
    response = new_exploration(client)
    assert response.status_code == 400
    assert "You have 1 explorations, the most one account may keep" in response.get_data(
        as_text=True)


def test_the_saved_network_of_a_run_can_be_explored(app, client, user):
    from conftest import newest_run_folder, upload_script
    upload_script(client, "train.py")
    network = os.path.join(newest_run_folder(app, 1), "networks", "train.keras")
    os.makedirs(os.path.dirname(network))
    with open(network, "wb") as f:
        f.write(keras_bytes())
    assert ('value="1">train.py \u00b7 run 1, newest (finished)'
            in client.get("/explore/").get_data(as_text=True))
    response = new_exploration(client, model=False, run_id="1")
    assert response.status_code == 302
    with app.app_context():
        exploration = db.session.get(Exploration, 1)
        assert (exploration.source, exploration.name) == ("run", "train.keras")


def test_a_network_kept_after_one_epoch_can_be_explored(app, client, user):
    from conftest import newest_run_folder, upload_script
    upload_script(client, "train.py")
    folder = newest_run_folder(app, 1)
    for epoch in (1, 2):
        path = os.path.join(folder, storage.network_epoch_file("train", epoch))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(keras_bytes())
    page = client.get("/explore/").get_data(as_text=True)
    assert 'value="1:1">train.py \u00b7 run 1, epoch 1' in page
    assert 'value="1:2">train.py \u00b7 run 1, epoch 2' in page
    assert new_exploration(client, model=False, run_id="1:2").status_code == 302
    response = new_exploration(client, model=False, run_id="1:7")
    assert response.status_code == 400
    assert ("Run 1 of train.py, epoch 7, has no saved network"
            in response.get_data(as_text=True))
    with app.app_context():
        assert [(e.source, e.name) for e in Exploration.query] == [("run", "train-epoch-2.keras")]


def test_a_run_without_a_saved_network_says_how_to_get_one(app, client, user):
    from conftest import newest_run_folder, upload_script
    upload_script(client, "train.py")
    newest_run_folder(app, 1)
    response = new_exploration(client, model=False, run_id="1")
    assert response.status_code == 400
    assert ("Run 1 of train.py has no saved network: run the script with "
            "callbacks.register_network_saver()") in response.get_data(as_text=True)


# --- state and results ---------------------------------------------------------------------------

def test_a_training_run_stops_the_oldest_exploration_job_when_every_run_slot_is_taken(
        app, client, user):
    from conftest import upload_script
    new_exploration(client)
    new_exploration(client)
    for job in (1, 2):  # both run slots (MAX_CONCURRENT_RUNS is 2) held by exploration jobs
        apply_run_update(app, run_update(job, "running", pid=job, started_at=1000.0 + job))
    upload_script(client, "train.py")
    client.post("/scripts/1/run", data={"images": "none"}, content_type="multipart/form-data")
    runner = app.extensions["runner"]
    assert runner.stopped == [1]
    assert [started[0] for started in runner.started] == [1, 2, 3]


def test_a_training_run_with_a_free_slot_stops_no_exploration_job(app, client, user):
    from conftest import upload_script
    new_exploration(client)
    apply_run_update(app, run_update(1, "running", pid=1))
    upload_script(client, "train.py")
    client.post("/scripts/1/run", data={"images": "none"}, content_type="multipart/form-data")
    assert app.extensions["runner"].stopped == []


def test_the_state_follows_the_job_from_starting_to_ready_to_ended(app, client, user):
    new_exploration(client)
    assert client.get("/explore/1/state.json").get_json() == {
        "state": "starting", "message": None, "notices": [], "images": []}
    apply_run_update(app, run_update(1, "running", pid=5))
    write_result(app, storage.EXPLORE_READY_FILE, {"notices": ["one.png: resized"], "images": [
        {"name": "one.png", "png": True}]})
    assert client.get("/explore/1/state.json").get_json() == {
        "state": "ready", "message": None, "notices": ["one.png: resized"],
        "images": [{"name": "one.png", "url": "/explore/1/inputs/0.png"}]}
    apply_run_update(app, run_update(1, "finished", exit_code=0))
    assert client.get("/explore/1/state.json").get_json()["state"] == "ended"


def test_a_failed_job_shows_its_own_message(app, client, user):
    new_exploration(client)
    write_result(app, storage.EXPLORE_FAILURE_FILE, {"message": "2 class names were given, but "
                                                                "the model has 10 outputs"})
    apply_run_update(app, run_update(1, "failed", exit_code=1, message="exited with code 1"))
    assert client.get("/explore/1/state.json").get_json()["message"] == \
        "2 class names were given, but the model has 10 outputs"
    assert "failed" in client.get("/explore/").get_data(as_text=True)


def test_a_job_killed_at_the_memory_limit_says_the_model_needs_more_memory(tmp_path):
    from conftest import AuthActions

    from visualizer.runner import _memory_message
    app = create_app(make_test_config(tmp_path, RUN_MEMORY_MB=300))
    client = app.test_client()
    AuthActions(client).register_and_login()
    new_exploration(client)
    apply_run_update(app, run_update(1, "failed", exit_code=-9, message=_memory_message(300)))
    state = client.get("/explore/1/state.json").get_json()
    assert state["state"] == "failed"
    assert state["message"].startswith("The model needs more memory than the limit of 300 MB")


def test_results_are_pending_until_the_job_wrote_them_then_served(app, client, user):
    new_exploration(client)
    response = client.get("/explore/1/predictions.json")
    assert response.status_code == 202 and response.get_json()["pending"] is True
    predictions = {"images": [{"name": "one.png", "top": [
        {"class_index": 1, "class_name": "dog", "probability": 0.75}]}]}
    write_result(app, storage.EXPLORE_PREDICTIONS_FILE, predictions)
    assert client.get("/explore/1/predictions.json").get_json() == predictions


def test_a_result_that_is_a_link_is_not_followed(app, client, user, tmp_path):
    new_exploration(client)
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": 1}')
    folder = write_result(app, "other.json", {})
    os.symlink(secret, storage.results_path(folder, storage.EXPLORE_ARCHITECTURE_FILE))
    response = client.get("/explore/1/architecture.json")
    assert response.status_code == 202 and "secret" not in response.get_data(as_text=True)


def ready_with_layer(app, client):
    new_exploration(client)
    apply_run_update(app, run_update(1, "running", pid=5))
    write_result(app, storage.EXPLORE_READY_FILE, {"notices": [], "images": [
        {"name": "one.png", "png": True}]})
    return write_result(app, storage.EXPLORE_ARCHITECTURE_FILE, {"nodes": [
        {"id": "conv2d"}, {"id": "inner/conv"}], "edges": []})


def test_a_layer_the_job_wrote_is_served_at_once(app, client, user):
    folder = ready_with_layer(app, client)
    layer = {"node": "inner/conv", "image": "one.png", "shape": [2, 1, 1], "activations": "AAA=",
             "range": [0, 1], "stats": [], "filters": None}
    storage.atomic_write_json(storage.layer_path(folder, "inner/conv", "one.png"), layer)
    assert client.get("/explore/1/layers/inner/conv.json?image=one.png").get_json() == layer


def test_a_layer_not_computed_yet_is_requested_from_the_job(app, client, user, monkeypatch):
    folder = ready_with_layer(app, client)
    monkeypatch.setattr(explore, "LAYER_WAIT_S", 0.05)
    response = client.get("/explore/1/layers/conv2d.json?image=one.png")
    assert response.status_code == 202 and response.get_json()["pending"] is True
    (request_file,) = os.listdir(os.path.join(folder, "requests"))
    assert json.load(open(os.path.join(folder, "requests", request_file))) == {
        "kind": "layer", "node": "conv2d", "image": "one.png"}


def test_a_request_to_an_ended_job_starts_it_again(app, client, user, monkeypatch):
    ready_with_layer(app, client)
    apply_run_update(app, run_update(1, "finished", exit_code=0))
    monkeypatch.setattr(explore, "LAYER_WAIT_S", 0.05)
    client.get("/explore/1/layers/conv2d.json?image=one.png")
    assert [run_id for run_id, _, _ in app.config["RUNNER"].started] == [1, 2]
    # while the job loads again, the earlier results still name the layers and images
    assert client.get("/explore/1/layers/inner/conv.json?image=one.png").status_code == 202
    assert client.get("/explore/1/state.json").get_json()["state"] == "ready"
    with app.app_context():
        assert [r.state for r in db.session.get(Exploration, 1).runs] == ["finished", "queued"]


def test_unknown_layers_and_images_are_404(app, client, user):
    ready_with_layer(app, client)
    assert client.get("/explore/1/layers/nope.json?image=one.png").status_code == 404
    assert client.get("/explore/1/layers/conv2d.json?image=two.png").status_code == 404


def test_a_compute_request_is_written_for_the_job_and_its_answer_polled(app, client, user):
    folder = ready_with_layer(app, client)
    response = client.post("/explore/1/compute", json={
        "technique": "grad_cam", "node": "conv2d", "image": "one.png", "unit": None})
    assert response.status_code == 202
    request_id, poll = response.get_json()["request"], response.get_json()["poll"]
    assert poll == "/explore/1/compute/%s.json" % request_id
    assert json.load(open(os.path.join(folder, "requests", request_id + ".json"))) == {
        "kind": "compute", "technique": "grad_cam", "node": "conv2d", "image": "one.png",
        "unit": None}
    assert client.get(poll).get_json() == {"state": "pending", "message": None, "results": []}
    storage.atomic_write_bytes(storage.compute_path(folder, request_id + "-grad_cam.png"),
                               png_bytes())
    storage.atomic_write_json(storage.compute_path(folder, request_id + ".json"), {
        "state": "done", "message": None, "results": [{
            "key": "grad_cam", "title": "Grad-CAM", "what": "w", "how": "h", "misleads": "m",
            "image": request_id + "-grad_cam.png", "caption": "for class 3"}]})
    answer = client.get(poll).get_json()
    assert answer["state"] == "done"
    (result,) = answer["results"]
    assert result["image_url"] == "/explore/1/compute/%s/%s-grad_cam.png" % (request_id,
                                                                              request_id)
    picture = client.get(result["image_url"])
    assert picture.status_code == 200 and picture.mimetype == "image/png"


@pytest.mark.parametrize("body,message", [
    ({"technique": "magic", "image": "one.png"}, "technique must be one of"),
    ({"technique": "all", "image": 3}, "image must be an image's name"),
    ({"technique": "all", "image": "one.png", "unit": -1}, "unit must be a filter or unit"),
])
def test_bad_compute_requests_are_refused_with_a_reason(app, client, user, body, message):
    ready_with_layer(app, client)
    response = client.post("/explore/1/compute", json=body)
    assert response.status_code == 400 and message in response.get_json()["message"]


def test_a_pending_request_of_a_job_that_ended_fails_with_a_message(app, client, user):
    ready_with_layer(app, client)
    poll = client.post("/explore/1/compute", json={"technique": "all", "node": None,
                                                   "image": "one.png"}).get_json()["poll"]
    apply_run_update(app, run_update(1, "finished", exit_code=0))
    answer = client.get(poll).get_json()
    assert answer["state"] == "failed" and "ended before it answered" in answer["message"]


# --- marks -------------------------------------------------------------------------------------

def test_marks_are_kept_per_user_and_model_across_explorations(app, client, auth):
    auth.register_and_login()
    new_exploration(client)
    new_exploration(client)  # the same model file: the same marks
    assert client.post("/explore/1/marks", json={"node": "conv2d", "filter": 3, "mark": "good"}
                       ).get_json() == {"conv2d": {"3": "good"}}
    client.post("/explore/1/marks", json={"node": "conv2d", "filter": 4, "mark": "bad"})
    assert client.get("/explore/2/marks.json").get_json() == {"conv2d": {"3": "good",
                                                                         "4": "bad"}}
    assert client.post("/explore/2/marks", json={"node": "conv2d", "filter": 3, "mark": None}
                       ).get_json() == {"conv2d": {"4": "bad"}}
    download = client.get("/explore/1/marks/download")
    assert json.loads(download.data) == {"conv2d": {"4": "bad"}}
    assert "attachment" in download.headers["Content-Disposition"]
    auth.logout()
    auth.register_and_login("bobby_2")
    new_exploration(client)  # bob's exploration of the same model has none of alice's marks
    assert client.get("/explore/3/marks.json").get_json() == {}


def test_a_bad_mark_is_refused(app, client, user):
    new_exploration(client)
    response = client.post("/explore/1/marks", json={"node": "conv2d", "filter": 1,
                                                     "mark": "great"})
    assert response.status_code == 400
    with app.app_context():
        assert FilterMark.query.count() == 0


# --- ownership, delete, demo ----------------------------------------------------------------------

def test_another_users_exploration_is_404_everywhere(app, client, auth):
    auth.register_and_login()
    new_exploration(client)
    auth.logout()
    auth.register_and_login("bobby_2")
    for url in ("/explore/1", "/explore/1/state.json", "/explore/1/predictions.json",
                "/explore/1/architecture.json", "/explore/1/layers/conv2d.json?image=one.png",
                "/explore/1/marks.json", "/explore/1/marks/download", "/explore/1/inputs/0.png",
                "/explore/1/compute/%s.json" % ("a" * 32)):
        assert client.get(url).status_code == 404, url
    for url, body in (("/explore/1/compute", {"technique": "all", "image": "one.png"}),
                      ("/explore/1/marks", {"node": "a", "filter": 0, "mark": "good"})):
        assert client.post(url, json=body).status_code == 404, url
    assert client.post("/explore/1/delete").status_code == 404
    assert count(app) == 1
    assert "net.keras" not in client.get("/explore/").get_data(as_text=True)


def test_deleting_an_exploration_stops_its_job_and_removes_its_folder_and_rows(app, client, user):
    new_exploration(client)
    apply_run_update(app, run_update(1, "running", pid=5))
    response = client.post("/explore/1/delete")
    assert response.status_code == 302 and response.headers["Location"] == "/explore/"
    assert app.config["RUNNER"].stopped == [1]
    assert count(app) == 0 and folders(app) == []
    with app.app_context():
        assert Run.query.count() == 0


def make_demo(folder):
    os.makedirs(os.path.join(folder, "images"))
    with open(os.path.join(folder, "model.keras"), "wb") as f:
        f.write(keras_bytes())
    for name in ("digit_3.png", "digit_7.png"):
        with open(os.path.join(folder, "images", name), "wb") as f:
            f.write(png_bytes())


def test_the_demo_makes_an_exploration_with_digit_class_names(tmp_path):
    from conftest import AuthActions
    app = create_app(make_test_config(tmp_path, DEMO_DIR=str(tmp_path / "demo")))
    make_demo(str(tmp_path / "demo"))
    client = app.test_client()
    AuthActions(client).register_and_login()
    assert "Open the demo" in client.get("/explore/").get_data(as_text=True)
    response = client.post("/explore/demo")
    assert response.status_code == 302 and response.headers["Location"] == "/explore/1"
    with app.app_context():
        exploration = db.session.get(Exploration, 1)
        assert exploration.source == "demo"
        assert json.loads(exploration.class_names) == [str(d) for d in range(10)]
        folder = exploration_dir(app, exploration)
    assert sorted(os.listdir(os.path.join(folder, "images"))) == ["digit_3.png", "digit_7.png"]


def test_without_the_demo_installed_the_page_says_how_to_set_it_up(tmp_path):
    from conftest import AuthActions
    app = create_app(make_test_config(tmp_path, DEMO_DIR=str(tmp_path / "missing")))
    client = app.test_client()
    AuthActions(client).register_and_login()
    response = client.post("/explore/demo", follow_redirects=True)
    assert "bash scripts/setup.sh" in response.get_data(as_text=True)
    assert count(app) == 0


def test_the_demo_folder_defaults_to_the_instance_folder(tmp_path):
    app = create_app(make_test_config(tmp_path))
    assert app.config["DEMO_DIR"] == str(tmp_path / "instance" / "demo")


def test_open_exploration_runs_are_reconciled_with_their_folder_at_start(tmp_path):
    config = make_test_config(tmp_path)
    app = create_app(config)
    client = app.test_client()
    from conftest import AuthActions
    AuthActions(client).register_and_login()
    new_exploration(client)
    runner = FakeRunner()
    create_app(dict(config, RUNNER=runner))
    folder = os.path.join(config["STORAGE_DIR"], "1", "explore@1")
    assert runner.reconciled == [[(1, "queued", None, folder, os.path.join(folder,
                                                                           "explore.py"))]]


def test_the_explorer_page_gets_the_json_endpoints(app, client, user):
    new_exploration(client)
    with app.test_request_context():
        with app.app_context():
            urls = explore.explore_urls(db.session.get(Exploration, 1))
    assert urls["state"] == "/explore/1/state.json" and urls["layers"] == "/explore/1/layers"
    assert urls["compute"] == "/explore/1/compute" and urls["marks"] == "/explore/1/marks.json"


def test_json_posts_need_the_csrf_token_which_the_page_sends_as_a_header(tmp_path):
    import re

    app = create_app(make_test_config(tmp_path, WTF_CSRF_ENABLED=True))
    client = app.test_client()
    token = re.search(r'name="csrf_token" value="([^"]+)"',
                      client.get("/auth/register").get_data(as_text=True)).group(1)
    client.post("/auth/register", data={"username": "alice_1", "password": "password123",
                                        "confirm": "password123", "csrf_token": token})
    page = client.get("/explore/").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    response = client.post("/explore/new", content_type="multipart/form-data", data={
        "csrf_token": token, "model": (io.BytesIO(keras_bytes()), "net.keras"),
        "inputs": [(io.BytesIO(png_bytes()), "one.png")]})
    assert response.status_code == 302
    mark = {"node": "conv2d", "filter": 0, "mark": "good"}
    assert client.post("/explore/1/marks", json=mark).status_code == 400
    assert client.post("/explore/1/marks", json=mark, headers={"X-CSRFToken": token}
                       ).get_json() == {"conv2d": {"0": "good"}}


def test_the_explore_settings_come_from_the_environment():
    from visualizer import config
    settings = config.settings_from_env({"VISUALIZER_EXPLORE_IDLE_S": "30",
                                         "VISUALIZER_EXPLORE_MODEL_MB": "50",
                                         "VISUALIZER_DEMO_DIR": "/srv/demo",
                                         "VISUALIZER_INSTANCE": "/srv/instance"})
    assert (settings["EXPLORE_IDLE_S"], settings["EXPLORE_MODEL_MB"]) == (30, 50)
    assert config.demo_dir(settings) == "/srv/demo"
    defaults = config.settings_from_env({"VISUALIZER_INSTANCE": "/srv/instance"})
    assert (defaults["EXPLORE_IDLE_S"], defaults["EXPLORE_MODEL_MB"]) == (600, 100)
    assert config.demo_dir(defaults) == "/srv/instance/demo"
    with pytest.raises(ValueError, match="VISUALIZER_EXPLORE_IDLE_S must be positive"):
        config.settings_from_env({"VISUALIZER_EXPLORE_IDLE_S": "0"})


def test_a_model_larger_than_other_uploads_passes_the_csrf_check_up_to_its_own_cap(tmp_path):
    import re
    app = create_app(make_test_config(tmp_path, WTF_CSRF_ENABLED=True, MAX_CONTENT_LENGTH=4096,
                                      EXPLORE_MODEL_MB=0.02))
    client = app.test_client()
    token = re.search(r'name="csrf_token" value="([^"]+)"',
                      client.get("/auth/register").get_data(as_text=True)).group(1)
    client.post("/auth/register", data={"username": "alice_1", "password": "password123",
                                        "confirm": "password123", "csrf_token": token})
    token = re.search(r'name="csrf_token" value="([^"]+)"',
                      client.get("/explore/").get_data(as_text=True)).group(1)

    def upload(padding):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("config.json", "{}")
            archive.writestr("metadata.json", "{}")
            archive.writestr("model.weights.h5", os.urandom(padding))  # not compressible
        return client.post("/explore/new", content_type="multipart/form-data", data={
            "csrf_token": token, "model": (io.BytesIO(buffer.getvalue()), "net.keras"),
            "inputs": [(io.BytesIO(png_bytes()), "one.png")]})

    assert upload(10000).status_code == 302  # over MAX_CONTENT_LENGTH, under the model's cap
    response = upload(40000)
    assert response.status_code == 413
    assert "The upload is larger than the limit of 0.0239058 MB; nothing was saved" in \
        response.get_data(as_text=True)
    assert count(app) == 1


def test_a_requests_folder_the_job_replaced_by_a_link_gets_no_request(app, client, user,
                                                                      tmp_path):
    folder = ready_with_layer(app, client)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rmdir(os.path.join(folder, "requests"))
    os.symlink(elsewhere, os.path.join(folder, "requests"))
    response = client.post("/explore/1/compute", json={"technique": "all", "node": None,
                                                       "image": "one.png"})
    assert response.status_code == 503
    assert "The request could not be written" in response.get_json()["message"]
    assert os.listdir(elsewhere) == []
