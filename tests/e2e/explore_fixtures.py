"""The explorer page against fixture data: the real app and template, fake JSON endpoints.

``ExplorerFixtureServer`` runs the visualizer app (no runner, no job) in a thread with
one extra blueprint that renders ``explore/view.html`` for a scenario and answers its
JSON endpoints with data shaped exactly as the Explore contract says (made here from
a few architectures: a small CNN, a residual net, a nested model, a deep chain). So the
page's drawing is tested, and timed, without Keras or a running job.
"""
import base64
import io
import threading
from pathlib import Path

import numpy as np
from flask import Blueprint, abort, jsonify, render_template, request, send_file, url_for
from PIL import Image
from werkzeug.serving import WSGIRequestHandler, make_server

from visualizer import create_app

DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_NAMES = ["digit_3.png", "digit_7.png"]
POLLS_BEFORE_DONE = 2  # a compute request answers "pending" this many times first
STARTING_POLLS = 2  # the "starting" scenario says "starting" this many times first
PASSWORD = "fixture-password-1"


def _node(node_id, type_name, output_shape, params, kind, parent=None, is_model=False,
          has_maps=False, has_filters=False, config=None):
    return {"id": node_id, "name": node_id.rsplit("/", 1)[-1], "type": type_name,
            "output_shape": output_shape, "params": params, "parent": parent,
            "is_model": is_model, "kind": kind, "has_maps": has_maps, "has_filters": has_filters,
            "config": config or {"name": node_id.rsplit("/", 1)[-1], "trainable": True}}


def _architecture(name, nodes, edges, non_trainable=0):
    total = sum(node["params"] for node in nodes if not node["parent"])
    return {"name": name, "total_params": total, "trainable_params": total - non_trainable,
            "non_trainable_params": non_trainable, "nodes": nodes,
            "edges": [{"source": s, "target": t, "shape": shape} for s, t, shape in edges]}


def small_cnn():
    """The demo's shape: input, two convolutions, pooling, dense to ten digits."""
    nodes = [
        _node("input_layer", "InputLayer", "(None, 28, 28, 1)", 0, "input"),
        _node("conv2d", "Conv2D", "(None, 26, 26, 8)", 80, "conv", has_maps=True, has_filters=True,
              config={"name": "conv2d", "filters": 8, "kernel_size": [3, 3], "activation": "relu",
                      "padding": "valid", "strides": [1, 1]}),
        _node("conv2d_1", "Conv2D", "(None, 24, 24, 16)", 1168, "conv", has_maps=True,
              has_filters=True),
        _node("max_pooling2d", "MaxPooling2D", "(None, 12, 12, 16)", 0, "pool", has_maps=True),
        _node("flatten", "Flatten", "(None, 2304)", 0, "other"),
        _node("dense", "Dense", "(None, 10)", 23050, "dense", has_filters=True),
    ]
    chain = [node["id"] for node in nodes]
    edges = [(a, b, next(n["output_shape"] for n in nodes if n["id"] == a))
             for a, b in zip(chain, chain[1:])]
    return _architecture("digits_demo", nodes, edges)


def residual_net(blocks=2):
    """A stem convolution, ``blocks`` residual blocks (two convolutions and a skip), a head."""
    shape = "(None, 28, 28, 8)"
    nodes = [_node("input_layer", "InputLayer", "(None, 28, 28, 1)", 0, "input"),
             _node("stem", "Conv2D", shape, 80, "conv", has_maps=True, has_filters=True)]
    edges = [("input_layer", "stem", "(None, 28, 28, 1)")]
    previous = "stem"
    for block in range(blocks):
        first, second, add = "block%d_conv1" % block, "block%d_conv2" % block, "block%d_add" % block
        nodes += [_node(first, "Conv2D", shape, 584, "conv", has_maps=True, has_filters=True),
                  _node(second, "Conv2D", shape, 584, "conv", has_maps=True, has_filters=True),
                  _node(add, "Add", shape, 0, "merge", has_maps=True)]
        edges += [(previous, first, shape), (first, second, shape), (second, add, shape),
                  (previous, add, shape)]
        previous = add
    nodes += [_node("pool", "GlobalAveragePooling2D", "(None, 8)", 0, "pool"),
              _node("dense", "Dense", "(None, 10)", 90, "dense", has_filters=True)]
    edges += [(previous, "pool", shape), ("pool", "dense", "(None, 8)")]
    return _architecture("residual", nodes, edges)


def branching_net():
    """An Inception-like block: three parallel branches of different depth, concatenated."""
    shape = "(None, 28, 28, 8)"
    nodes = [_node("input_layer", "InputLayer", "(None, 28, 28, 1)", 0, "input")]
    for node_id, type_name, kind in [("branch1_conv", "Conv2D", "conv"),
                                     ("branch2_reduce", "Conv2D", "conv"),
                                     ("branch2_conv", "Conv2D", "conv"),
                                     ("branch3_pool", "MaxPooling2D", "pool"),
                                     ("branch3_conv", "Conv2D", "conv")]:
        nodes.append(_node(node_id, type_name, shape, 80 if kind == "conv" else 0, kind,
                           has_maps=True, has_filters=kind == "conv"))
    nodes += [_node("concatenate", "Concatenate", "(None, 28, 28, 24)", 0, "merge", has_maps=True),
              _node("pool", "GlobalAveragePooling2D", "(None, 24)", 0, "pool"),
              _node("dense", "Dense", "(None, 10)", 250, "dense", has_filters=True)]
    edges = [("input_layer", "branch1_conv", "(None, 28, 28, 1)"),
             ("input_layer", "branch2_reduce", "(None, 28, 28, 1)"),
             ("input_layer", "branch3_pool", "(None, 28, 28, 1)"),
             ("branch2_reduce", "branch2_conv", shape), ("branch3_pool", "branch3_conv", shape),
             ("branch1_conv", "concatenate", shape), ("branch2_conv", "concatenate", shape),
             ("branch3_conv", "concatenate", shape),
             ("concatenate", "pool", "(None, 28, 28, 24)"), ("pool", "dense", "(None, 24)")]
    return _architecture("branching", nodes, edges)


def nested_model():
    """An outer model around an inner ``features`` model (its own input, conv, pooling)."""
    nodes = [
        _node("input_layer", "InputLayer", "(None, 28, 28, 1)", 0, "input"),
        _node("features", "Functional", "(None, 13, 13, 8)", 80, "model", is_model=True,
              has_maps=True),
        _node("features/input_layer_1", "InputLayer", "(None, 28, 28, 1)", 0, "input",
              parent="features"),
        _node("features/conv2d", "Conv2D", "(None, 26, 26, 8)", 80, "conv", parent="features",
              has_maps=True, has_filters=True),
        _node("features/max_pooling2d", "MaxPooling2D", "(None, 13, 13, 8)", 0, "pool",
              parent="features", has_maps=True),
        _node("flatten", "Flatten", "(None, 1352)", 0, "other"),
        _node("dense", "Dense", "(None, 10)", 13530, "dense", has_filters=True),
    ]
    edges = [("input_layer", "features", "(None, 28, 28, 1)"),
             ("features/input_layer_1", "features/conv2d", "(None, 28, 28, 1)"),
             ("features/conv2d", "features/max_pooling2d", "(None, 26, 26, 8)"),
             ("features", "flatten", "(None, 13, 13, 8)"),
             ("flatten", "dense", "(None, 1352)")]
    return _architecture("nested", nodes, edges)


def deep_net(layers=150):
    """A residual chain of ``layers`` layers: conv, norm, activation, and an Add every block."""
    shape = "(None, 14, 14, 32)"
    nodes = [_node("input_layer", "InputLayer", "(None, 28, 28, 1)", 0, "input")]
    edges = []
    previous, skip_from = "input_layer", "input_layer"
    kinds = [("Conv2D", "conv", 9248), ("BatchNormalization", "norm", 128), ("ReLU", "activation", 0)]
    index = 0
    while len(nodes) < layers - 2:
        type_name, kind, params = kinds[index % 3]
        node_id = "%s_%d" % (type_name.lower(), index)
        nodes.append(_node(node_id, type_name, shape, params, kind, has_maps=True,
                           has_filters=kind == "conv"))
        edges.append((previous, node_id, shape))
        previous = node_id
        index += 1
        if index % 6 == 0:
            add_id = "add_%d" % index
            nodes.append(_node(add_id, "Add", shape, 0, "merge", has_maps=True))
            edges += [(previous, add_id, shape), (skip_from, add_id, shape)]
            previous = skip_from = add_id
    nodes += [_node("pool", "GlobalAveragePooling2D", "(None, 32)", 0, "pool"),
              _node("dense", "Dense", "(None, 10)", 330, "dense", has_filters=True)]
    edges += [(previous, "pool", shape), ("pool", "dense", "(None, 32)")]
    return _architecture("deep_%d" % layers, nodes, edges)


SCENARIOS = {"demo": small_cnn, "residual": residual_net, "nested": nested_model,
             "branching": branching_net,
             "deep": deep_net, "starting": small_cnn, "failed": small_cnn}
FAILURE_MESSAGE = ("model.keras could not be loaded: the layer class 'MyCustomLayer' is unknown. "
                   "Upload the model together with a custom-objects script that defines it.")


def _digit_image(name):
    picture = np.zeros((28, 28), np.uint8)
    if "3" in name:
        picture[5:8, 8:20] = picture[12:15, 10:20] = picture[20:23, 8:20] = 255
        picture[5:23, 17:20] = 255
    else:
        picture[5:8, 8:21] = 255
        for row in range(8, 23):
            picture[row, 20 - (row - 8) // 2: 23 - (row - 8) // 2] = 255
    return picture


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    buffer.seek(0)
    return buffer


def _shape_numbers(text):
    return [int(part) for part in text.strip("()").split(",") if part.strip().isdigit()]


def layer_answer(node, image):
    """The layer endpoint's answer for ``node``: smooth maps that differ by channel."""
    numbers = _shape_numbers(node["output_shape"])
    rng = np.random.default_rng(abs(hash((node["id"], image))) % 2 ** 32)
    if len(numbers) == 3:
        height, width, channels = numbers
        y, x = np.mgrid[0:height, 0:width] / max(height, width)
        maps = np.stack([np.sin((c % 4 + 1) * 3 * x + c) * np.cos((c % 3 + 1) * 3 * y)
                         + rng.normal(0, .15, (height, width)) for c in range(channels)])
        shape = [channels, height, width]
    else:
        channels = numbers[-1]
        maps = rng.random(channels)
        shape = [channels]
    low, high = float(maps.min()), float(maps.max())
    scaled = ((maps - maps.min(axis=tuple(range(1, maps.ndim)), keepdims=True)
               if maps.ndim > 1 else maps - low))
    peak = scaled.max(axis=tuple(range(1, maps.ndim)), keepdims=True) if maps.ndim > 1 else scaled.max()
    values = np.round(scaled / np.maximum(peak, 1e-9) * 255).astype(np.uint8)
    stats = [{"index": c, "mean": float(rng.random()), "zero_fraction": float(rng.random() * .6)}
             for c in range(channels)]
    filters = None
    if node["has_filters"] and node["kind"] == "conv":
        inputs = 1 if node["id"] in ("conv2d", "stem", "features/conv2d") else 8
        weights = rng.integers(0, 256, (channels, 3, 3, inputs), dtype=np.uint8)
        filters = {"shape": list(weights.shape), "rgb": False,
                   "data": base64.b64encode(weights.tobytes()).decode()}
    return {"node": node["id"], "image": image, "shape": shape,
            "activations": base64.b64encode(values.tobytes()).decode(), "range": [low, high],
            "stats": stats, "filters": filters}


def technique_result(key, title, image_url):
    return {"key": key, "title": title, "image_url": image_url,
            "caption": "%s for the predicted class" % title,
            "what": "Which pixels %s says mattered most." % title,
            "how": "Bright means the prediction depends on that pixel.",
            "misleads": "It can look convincing even for a network that guesses."}


ALL_TECHNIQUES = [("saliency", "Saliency"), ("deconvolution", "Deconvolution"),
                  ("deep_visualization", "Deep visualization"), ("grad_cam", "Grad-CAM"),
                  ("integrated_gradients", "Integrated gradients")]


def fixture_blueprint():
    """The fake ``/explore-fixture/<scenario>`` pages and their JSON endpoints."""
    bp = Blueprint("explore_fixture", __name__, url_prefix="/explore-fixture/<scenario>")
    calls = {"state": {}, "compute": {}, "marks": {}, "requests": [], "layers": {}}

    def architecture(scenario):
        if scenario not in SCENARIOS:
            abort(404)
        return SCENARIOS[scenario]()

    @bp.route("/")
    def page(scenario):
        architecture(scenario)
        names = ["state", "predictions", "architecture", "compute", "marks", "set_mark",
                 "marks_download"]
        urls = {name: url_for("explore_fixture." + name, scenario=scenario) for name in names}
        urls["layers"] = url_for("explore_fixture.page", scenario=scenario) + "layers"
        return render_template("explore/view.html", urls=urls,
                               exploration={"id": 1, "name": "Fixture " + scenario})

    @bp.route("/state.json")
    def state(scenario):
        architecture(scenario)
        polls = calls["state"][scenario] = calls["state"].get(scenario, 0) + 1
        answer = {"state": "ready", "message": None, "notices": [],
                  "images": [{"name": name, "url": url_for("explore_fixture.image",
                                                           scenario=scenario, name=name)}
                             for name in IMAGE_NAMES]}
        if scenario == "starting" and polls <= STARTING_POLLS:
            answer.update(state="starting", message="Loading the model (step %d)" % polls)
        elif scenario == "starting":
            answer["notices"] = ["digit_7.png was 32×32 RGB; it was converted to 28×28 grey."]
        if scenario == "failed":
            answer.update(state="failed", message=FAILURE_MESSAGE, images=[])
        return jsonify(answer)

    @bp.route("/images/<name>")
    def image(scenario, name):
        return send_file(_png(_digit_image(name)), mimetype="image/png")

    @bp.route("/predictions.json")
    def predictions(scenario):
        architecture(scenario)
        answer = []
        for name in IMAGE_NAMES:
            best = 3 if "3" in name else 7
            probabilities = [.81, .09, .05, .03, .01]
            classes = [best, 8, 5, 2, 9]
            answer.append({"name": name, "top": [
                {"class_index": c, "class_name": DIGIT_CLASSES[c], "probability": p}
                for c, p in zip(classes, probabilities)]})
        return jsonify({"images": answer})

    def architecture_json(scenario):
        return jsonify(architecture(scenario))
    bp.add_url_rule("/architecture.json", "architecture", architecture_json)

    @bp.route("/layers/<path:node_id>.json")
    def layer(scenario, node_id):
        nodes = {node["id"]: node for node in architecture(scenario)["nodes"]}
        if node_id not in nodes:
            abort(404)
        asked = calls["layers"][scenario, node_id] = calls["layers"].get((scenario, node_id), 0) + 1
        if scenario == "starting" and asked == 1:
            return jsonify({"pending": True, "message": "The analysis job is computing this layer"}), 202
        return jsonify(layer_answer(nodes[node_id], request.args.get("image", IMAGE_NAMES[0])))

    @bp.route("/compute", methods=["POST"])
    def compute(scenario):
        body = request.get_json()
        calls["requests"].append(body)
        request_id = str(len(calls["requests"]))
        calls["compute"][request_id] = 0
        return jsonify({"request": request_id,
                        "poll": url_for("explore_fixture.poll", scenario=scenario,
                                        request_id=request_id)}), 202

    @bp.route("/compute/<request_id>")
    def poll(scenario, request_id):
        body = calls["requests"][int(request_id) - 1]
        polls = calls["compute"][request_id] = calls["compute"][request_id] + 1
        result_url = url_for("explore_fixture.result", scenario=scenario, request_id=request_id)
        if body["technique"] == "all":
            ready = ALL_TECHNIQUES[:polls * 2]
            return jsonify({"state": "done" if len(ready) == len(ALL_TECHNIQUES) else "pending",
                            "message": None,
                            "results": [technique_result(k, t, result_url + "?key=" + k)
                                        for k, t in ready]})
        if polls <= POLLS_BEFORE_DONE:
            return jsonify({"state": "pending", "message": None, "results": []})
        if body["technique"] == "deep_visualization" and body.get("unit") == 99:
            return jsonify({"state": "failed", "results": [],
                            "message": "unit 99 does not exist: this layer has 8 filters"})
        title = dict(ALL_TECHNIQUES)[body["technique"]]
        return jsonify({"state": "done", "message": None,
                        "results": [technique_result(body["technique"], title, result_url)]})

    @bp.route("/compute/<request_id>/result.png")
    def result(scenario, request_id):
        y, x = np.mgrid[0:56, 0:56]
        heat = (255 * np.exp(-((x - 30) ** 2 + (y - 24) ** 2) / 200)).astype(np.uint8)
        return send_file(_png(np.stack([heat, heat // 3, 255 - heat], axis=-1)), mimetype="image/png")

    @bp.route("/marks.json")
    def marks(scenario):
        return jsonify(calls["marks"].setdefault(scenario, {}))

    @bp.route("/marks", methods=["POST"])
    def set_mark(scenario):
        body = request.get_json()
        marks = calls["marks"].setdefault(scenario, {})
        node_marks = marks.setdefault(body["node"], {})
        if body["mark"] is None:
            node_marks.pop(str(body["filter"]), None)
        else:
            node_marks[str(body["filter"])] = body["mark"]
        return jsonify(marks)

    @bp.route("/marks/download")
    def marks_download(scenario):
        response = jsonify(calls["marks"].get(scenario, {}))
        response.headers["Content-Disposition"] = "attachment; filename=marks.json"
        return response

    bp.calls = calls
    return bp


class _NoRunner:
    def start(self, *args, **kwargs):
        raise AssertionError("the explorer fixtures start no runs")

    def reconcile(self, records):
        return []


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        pass


class ExplorerFixtureServer:
    """The app with the fixture blueprint, served on a free port in a thread.

    Args:
        root: a fresh folder for the database and storage.
    """

    def __init__(self, root):
        root = Path(root)
        self.app = create_app({
            "TESTING": True, "SECRET_KEY": "fixture-secret", "WTF_CSRF_ENABLED": False,
            "INSTANCE_DIR": str(root / "instance"), "STORAGE_DIR": str(root / "storage"),
            "SQLALCHEMY_DATABASE_URI": "sqlite:///" + str(root / "fixture.sqlite"),
            "BOKEH_URL": "http://127.0.0.1:9", "RUNNER": _NoRunner()})
        self.blueprint = fixture_blueprint()
        self.app.register_blueprint(self.blueprint)
        self._server = make_server("127.0.0.1", 0, self.app, threaded=True,
                                   request_handler=_QuietHandler)
        self.url = "http://127.0.0.1:%d" % self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def calls(self):
        """What the page asked: ``requests`` (compute bodies), ``marks`` per scenario."""
        return self.blueprint.calls

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._server.shutdown()

    def log_in(self, context, username="explorer"):
        """Creates ``username`` and logs ``context`` (a Playwright browser context) in."""
        form = {"username": username, "password": PASSWORD, "confirm": PASSWORD}
        context.request.post(self.url + "/auth/register", form=form)
        context.request.post(self.url + "/auth/login", form=form)

    def page_url(self, scenario):
        return "%s/explore-fixture/%s/" % (self.url, scenario)
