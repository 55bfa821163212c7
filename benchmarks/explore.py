"""Benchmarks of Explore (issue 13), through the web app and the real runner with its sandbox.

- Reference network (the thesis' MNIST network, trained briefly as the demo is): the
  median over 20 layer clicks (``GET /explore/<id>/layers/<node>.json``, every layer of
  every image in turn, as soon as the job says "ready", so some are answered on request
  and some from the job's precomputed files), and the median round trip of a
  deconvolution and a Grad-CAM request (``POST compute`` + polling until done) over a
  few maps; targets 1 s and 3 s (printed as ratios: below 1 meets the target).
- A 150-layer network (a generated residual CNN): its architecture JSON built by the job
  (in-process, the median of 5), the median of 20 layer clicks through the job, and, as a
  model too large to keep every layer's outputs would be served, 20 layers computed on
  request in-process with no outputs kept, each of another image than the one before
  (a forward pass each).

Run with ``.venv/bin/python -m benchmarks.explore``. Timings only: nothing is asserted.
"""
import io
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

LAYER_TARGET_S = 1.0
COMPUTE_TARGET_S = 3.0
ARCHITECTURE_TARGET_S = 2.0
CLICKS = 20
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(REPO_ROOT, "scripts", "examples", "images")


def deep_residual_model(blocks=36):
    """A residual CNN of 4 * blocks + 6 layers (150 with 36 blocks) on 32x32x3."""
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    for _ in range(blocks):
        y = keras.layers.Conv2D(16, 3, padding="same")(x)
        y = keras.layers.BatchNormalization()(y)
        y = keras.layers.ReLU()(y)
        x = keras.layers.Add()([x, y])
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(32, activation="relu")(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def model_bytes(model):
    path = tempfile.mktemp(suffix=".keras")
    model.save(path)
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


def start_exploration(client, model_data, images):
    response = client.post("/explore/new", content_type="multipart/form-data", data={
        "model": (io.BytesIO(model_data), "model.keras"),
        "inputs": [(io.BytesIO(data), name) for name, data in images]})
    assert response.status_code == 302, response.get_data(as_text=True)
    exploration = response.headers["Location"].rsplit("/", 1)[-1]
    deadline = time.time() + 300
    while time.time() < deadline:
        state = client.get("/explore/%s/state.json" % exploration).get_json()
        if state["state"] != "starting":
            break
        time.sleep(0.05)
    assert state["state"] == "ready", state
    return "/explore/%s" % exploration


def layer_clicks(client, base, images, count=CLICKS):
    nodes = [n["id"] for n in client.get(base + "/architecture.json").get_json()["nodes"]
             if not n["is_model"]]
    times = []
    for click in range(count):
        node, (image, _) = nodes[click % len(nodes)], images[click % len(images)]
        started = time.perf_counter()
        while True:
            response = client.get("%s/layers/%s.json?image=%s" % (base, node, image))
            if response.status_code == 200:
                break
        response.get_json()
        times.append(time.perf_counter() - started)
    return times


def compute_round_trips(client, base, technique, node, image, units):
    times = []
    for unit in units:
        started = time.perf_counter()
        poll = client.post(base + "/compute", json={"technique": technique, "node": node,
                                                    "image": image, "unit": unit}).get_json()
        while True:
            answer = client.get(poll["poll"]).get_json()
            if answer["state"] != "pending":
                break
            time.sleep(0.02)
        assert answer["state"] == "done", answer
        times.append(time.perf_counter() - started)
    return times


def on_request_layers(model, images, count=CLICKS):
    """Seconds per layer file written by the job when it keeps no outputs and the image changes
    at every click (the worst case of a large model)."""
    from custom_keras import explore

    with tempfile.TemporaryDirectory() as folder:
        model.save(os.path.join(folder, "model.keras"))
        os.makedirs(os.path.join(folder, "images"))
        for name, data in images:
            with open(os.path.join(folder, "images", name), "wb") as f:
                f.write(data)
        kept, explore.KEEP_OUTPUTS_BYTES = explore.KEEP_OUTPUTS_BYTES, 0
        try:
            explorer = explore.Explorer.load(folder)
            explorer.analyse()
        finally:
            explore.KEEP_OUTPUTS_BYTES = kept
        nodes = [n["id"] for n in explore.architecture(model)["nodes"]]
        times = []
        for click in range(count):
            started = time.perf_counter()
            explorer.layer(nodes[(click * 7) % len(nodes)], explorer.names[click % 2])
            times.append(time.perf_counter() - started)
        return times


def report(name, times, target):
    median = statistics.median(times)
    print("%-52s median %6.3f s  (first %6.3f s, n=%d)  ratio to the %g s target: %.2f"
          % (name, median, times[0], len(times), target, median / target), flush=True)


def main():
    import keras

    from custom_keras import explore
    from custom_keras.reference import build_reference_model, load_digits_28
    from visualizer import create_app

    sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))
    from conftest import AuthActions, make_test_config

    with tempfile.TemporaryDirectory() as root:
        from pathlib import Path
        app = create_app(make_test_config(Path(root), RUNNER=None, EXPLORE_IDLE_S=120))
        client = app.test_client()
        AuthActions(client).register_and_login()
        try:
            keras.utils.set_random_seed(0)
            reference = build_reference_model()
            x, y = load_digits_28(seed=0)
            reference.fit(x, y, epochs=1, verbose=0)
            images = [(name, open(os.path.join(IMAGES, name), "rb").read())
                      for name in sorted(os.listdir(IMAGES))]
            base = start_exploration(client, model_bytes(reference), images)
            report("reference network: layer click -> JSON", layer_clicks(client, base, images),
                   LAYER_TARGET_S)
            report("reference network: deconvolution round trip", compute_round_trips(
                client, base, "deconvolution", "conv2d_1", images[0][0], [0, 1, 2, 3, 4]),
                COMPUTE_TARGET_S)
            report("reference network: Grad-CAM round trip", compute_round_trips(
                client, base, "grad_cam", "conv2d_1", images[0][0], [None] * 5),
                COMPUTE_TARGET_S)

            deep = deep_residual_model()
            print("generated network: %d layers" % len(deep.layers), flush=True)
            times = []
            for _ in range(5):
                started = time.perf_counter()
                explore.architecture(deep)
                times.append(time.perf_counter() - started)
            report("150 layers: architecture JSON built", times, ARCHITECTURE_TARGET_S)
            colour = [("%d.png" % i, data) for i, (_, data) in enumerate(images[:2])]
            report("150 layers: layer on request, outputs not kept", on_request_layers(
                deep, colour), LAYER_TARGET_S)
            base = start_exploration(client, model_bytes(deep), colour)
            report("150 layers: layer click -> JSON", layer_clicks(client, base, colour),
                   LAYER_TARGET_S)
        finally:
            app.extensions["runner"].shutdown(stop_runs=True)


if __name__ == "__main__":
    main()
