"""An exploration through the real runner and its sandbox: the job starts, analyses a model,
answers a layer and a technique request, and a job over the memory limit says so."""
import io
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from conftest import AuthActions, make_test_config, png_bytes  # noqa: E402

from visualizer import create_app  # noqa: E402


def small_model_bytes(tmp_path):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(2, 3, activation="relu", name="conv")(inputs)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(keras.layers.Flatten()(x))
    path = tmp_path / "small.keras"
    keras.Model(inputs, outputs).save(path)
    return path.read_bytes()


def start(tmp_path, **settings):
    app = create_app(make_test_config(tmp_path, RUNNER=None, **settings))
    client = app.test_client()
    AuthActions(client).register_and_login()
    response = client.post("/explore/new", content_type="multipart/form-data", data={
        "model": (io.BytesIO(small_model_bytes(tmp_path)), "small.keras"),
        "inputs": [(io.BytesIO(png_bytes((8, 8))), "a.png")]})
    assert response.status_code == 302
    return app, client


def wait_for(client, url, done, limit_s=120):
    deadline = time.time() + limit_s
    while True:
        answer = client.get(url).get_json()
        if done(answer) or time.time() > deadline:
            return answer
        time.sleep(0.2)


def test_a_job_in_the_sandbox_analyses_the_model_and_answers_requests(tmp_path):
    app, client = start(tmp_path, EXPLORE_IDLE_S=60)
    try:
        state = wait_for(client, "/explore/1/state.json", lambda s: s["state"] != "starting")
        assert state["state"] == "ready", state
        assert client.get("/explore/1/architecture.json").get_json()["nodes"][1]["id"] == "conv"
        layer = client.get("/explore/1/layers/conv.json?image=a.png").get_json()
        assert layer["shape"] == [2, 6, 6] and len(layer["stats"]) == 2
        poll = client.post("/explore/1/compute", json={
            "technique": "grad_cam", "node": "conv", "image": "a.png", "unit": None}
        ).get_json()["poll"]
        answer = wait_for(client, poll, lambda a: a["state"] != "pending")
        assert answer["state"] == "done", answer
        assert client.get(answer["results"][0]["image_url"]).mimetype == "image/png"
    finally:
        app.extensions["runner"].shutdown(stop_runs=True)


def test_a_job_over_the_memory_limit_says_the_model_needs_more_memory(tmp_path):
    app, client = start(tmp_path, RUN_MEMORY_MB=100)
    try:
        state = wait_for(client, "/explore/1/state.json", lambda s: s["state"] != "starting")
        assert state["state"] == "failed"
        assert state["message"].startswith("The model needs more memory than the limit of 100 MB")
    finally:
        app.extensions["runner"].shutdown(stop_runs=True)
