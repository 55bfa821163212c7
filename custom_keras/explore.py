"""The analysis job of an exploration: a trained model, some inputs, every layer (issue 13).

The server writes an exploration's folder (``storage``'s "explorations" section: the
model, the inputs, class names, a job script that calls ``main``) and starts it in the
sandboxed runner like a training script. The job

1. loads ``model.keras`` (safe mode: no Python code from the file) and converts the
   inputs to what the model takes (size, grey or colour, saying so in notices);
2. writes the architecture (the model's own layer graph, nested models included), the
   top-5 predictions per input, each input as fed (PNG) and the ready file;
3. answers the server's requests (``requests/<id>.json``): a layer's activations for one
   input (``results/layers/``), or a technique for one input (``results/compute/``), and
   meanwhile precomputes the layers no one asked for yet;
4. exits when no request came for the idle time in ``explore_settings.json``.

A model or input the job cannot use ends it with one line in
``results/explore_failure.json`` that the page shows. The functions are plain, so tests
call them on a folder in-process.
"""
import base64
import io
import json
import os
import re
import sys
import time
import traceback
import zipfile

import numpy as np

from custom_keras import storage

DEFAULT_IDLE_S = 600
REQUEST_POLL_S = 0.02
TOP_PREDICTIONS = 5
MAX_SAMPLES = 64
FIRST_PASS_BATCH = 8
# The outputs of every layer for every input are kept in memory up to this size; above it,
# one input's outputs are computed when a layer of it is asked for (and kept for the next).
KEEP_OUTPUTS_BYTES = 256 * storage.MIB
# Layer files written before anyone asks for them, at most (the rest on request).
PRECOMPUTE_BYTES = 64 * storage.MIB
# Filters larger than this (values) are not sent: no one reads 512 x 3 x 3 x 512 weights.
MAX_FILTER_VALUES = 4 * 1000 * 1000
MAX_CONFIG_CHARS = 400
# Deep visualization's settings: set 3 of Yosinski et al.'s Table 2.1, as the registry's example.
DEEP_VISUALIZATION = dict(learning_rate=200, no_of_iterations=50, l2_decay=0.0001,
                          blur_interval=4, blur_std=1.0)
KINDS = (
    ("input", ("InputLayer",)),
    ("conv", ("Conv1D", "Conv2D", "Conv3D", "SeparableConv1D", "SeparableConv2D",
              "DepthwiseConv1D", "DepthwiseConv2D", "Conv1DTranspose", "Conv2DTranspose",
              "Conv3DTranspose")),
    ("dense", ("Dense", "EinsumDense")),
    ("pool", ("MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D",
              "AveragePooling2D", "AveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D",
              "GlobalAveragePooling1D", "GlobalAveragePooling2D")),
    ("norm", ("BatchNormalization", "LayerNormalization", "GroupNormalization",
              "UnitNormalization")),
    ("activation", ("Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax")),
    ("merge", ("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate",
               "Dot")),
)
# The plain-language texts of the techniques the explorer computes: what it shows, how to
# read it, one way it misleads.
EXPLANATIONS = {
    "saliency": (
        "Saliency map",
        "Which input pixels most change the score of the predicted class (the gradient).",
        "Bright pixels are those where a small change moves the score most.",
        "It shows sensitivity, not evidence: a pixel can matter to the gradient without being "
        "what the network 'looked at', and maps are often noisy."),
    "deconvolution": (
        "Deconvolution",
        "The pattern in the input that caused one feature map's strongest activation (Zeiler & "
        "Fergus), mapped back to pixels.",
        "The visible strokes are what that map responds to at its most active position.",
        "It shows one position of one map only, and mostly edges: it looks similar for many "
        "classes, so it says little about the decision."),
    "deep_visualization": (
        "Deep visualization",
        "A synthetic input grown from noise that a chosen unit responds to strongly (Yosinski "
        "et al.).",
        "Repeated shapes hint at what the unit detects; for an output unit, what the network "
        "thinks the class looks like.",
        "The regularisers shape the picture as much as the network does; an unreadable image "
        "does not mean the unit is useless."),
    "grad_cam": (
        "Grad-CAM",
        "Where in the image the evidence for the class lies, from a layer's feature maps "
        "weighted by their gradients (Selvaraju et al.).",
        "Warm regions raised the class score; the map is coarse, at the layer's resolution.",
        "A late layer's low resolution blurs the map over neighbouring objects; an early "
        "layer's map is sharp but says little about the class."),
    "grad_cam_plus_plus": (
        "Grad-CAM++",
        "Like Grad-CAM, with weights that favour positive gradients (Chattopadhyay et al.).",
        "Warm regions raised the class score; several instances of a class show up better.",
        "Same coarse resolution as Grad-CAM; brighter does not mean more certain."),
    "score_cam": (
        "Score-CAM",
        "Feature maps weighted by how much masking the input with each raises the class "
        "probability (Wang et al.).",
        "Warm regions are those that alone keep the class probable.",
        "Needs one forward pass per map, and the masked inputs are unlike real images."),
    "guided_backprop": (
        "Guided backpropagation",
        "The gradient passed back through ReLUs only where both the activation and the "
        "gradient are positive.",
        "Sharp, edge-like detail of the input that raised the score.",
        "It looks much the same for every class: it reconstructs the image more than it "
        "explains the decision."),
    "guided_grad_cam": (
        "Guided Grad-CAM",
        "Guided backpropagation multiplied by Grad-CAM: fine detail inside the class's region.",
        "Detail that is both sharp and inside the region that raised the class score.",
        "Inherits guided backpropagation's class-insensitivity within the region."),
    "smooth_grad": (
        "SmoothGrad",
        "The gradient averaged over many noisy copies of the input (Smilkov et al.).",
        "Bright pixels matter to the score consistently, not by chance.",
        "The noise level changes the picture; too much noise blurs it into the object's shape."),
    "integrated_gradients": (
        "Integrated gradients",
        "Gradients summed along a path from a black image to the input (Sundararajan et al.).",
        "Each pixel's share of the score difference between the black image and the input.",
        "Depends on the baseline: features that are black in the input get no credit."),
    "occlusion": (
        "Occlusion",
        "How much the class score drops when a patch of the input is covered (Zeiler & Fergus).",
        "Warm regions are those whose covering hurts the prediction most.",
        "The patch size sets what can be found; covering with grey creates edges of its own."),
    "lrp": (
        "Layer-wise relevance propagation",
        "The class score passed back layer by layer as relevance of each pixel (Bach et al.).",
        "Bright pixels carry a large share of the score.",
        "The rule chosen (epsilon, alpha-beta) changes the map markedly."),
}
ATTRIBUTION_METHODS = ("grad_cam", "grad_cam_plus_plus", "score_cam", "guided_backprop",
                       "guided_grad_cam", "smooth_grad", "integrated_gradients", "occlusion", "lrp")


class ExploreError(Exception):
    """The job cannot explore this model or these inputs; the message says why, in one line."""


# --- loading -------------------------------------------------------------------------------

def load_model(folder):
    """The model of the folder, loaded in safe mode; ``ExploreError`` with a clear line if not."""
    import keras

    path = os.path.join(folder, storage.EXPLORE_MODEL_FILE)
    how = "Save the model with model.save('name.keras') (Keras 3) and upload that file."
    if not zipfile.is_zipfile(path):
        raise ExploreError("The model file is not a Keras model file (.keras archive). " + how)
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises many types for files it cannot read
        raise ExploreError(load_error_message(error, path)) from None


def load_error_message(error, path):
    """One line on why Keras could not load the model, and what the user can do."""
    text = str(error)
    missing = re.search(r"Could not locate (?:class|function) '([^']+)'", text)
    if missing:
        name = missing.group(1)
        registered = _registered_name(path, name)
        return ("The model uses a custom class %s%s that this server does not have, so it cannot "
                "be loaded here: save the model with built-in Keras layers only, or ask the "
                "server's operator to install the module that registers it (with "
                "@keras.saving.register_keras_serializable)."
                % (name, " (registered as %s)" % registered if registered else ""))
    if "Lambda" in text and "safe_mode" in text:
        return ("The model has a Lambda layer with Python code, which is never loaded here "
                "(safe mode, as the code could do anything): replace the Lambda layer by "
                "built-in layers and save the model again.")
    first_line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return ("The model file could not be loaded (%s: %s); it may be damaged or saved by another "
            "Keras version. Save it again with model.save('name.keras') and upload it."
            % (type(error).__name__, first_line[:300]))


def _registered_name(path, class_name):
    """The ``registered_name`` of a class in the archive's config (e.g. "mine>MyLayer"), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    pending = [config]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if item.get("class_name") == class_name and isinstance(item.get("registered_name"),
                                                                   str):
                return item["registered_name"]
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None


def input_shape(model):
    """The shape of one sample the model takes (None for any size), e.g. (28, 28, 1)."""
    if len(model.inputs) != 1:
        raise ExploreError("The model has %d inputs; exploring needs a model with one input."
                           % len(model.inputs))
    return tuple(model.inputs[0].shape[1:])


def load_inputs(folder, shape):
    """The inputs of the folder as the model takes them.

    Args:
        folder: the exploration's folder (``images/`` or ``inputs.npy``).
        shape: one sample's shape (``input_shape``).

    Returns:
        (float32 array (N, ...) , names, notices): notices say what was converted.
    """
    array_path = os.path.join(folder, storage.EXPLORE_INPUTS_FILE)
    if os.path.isfile(array_path):
        return _load_array(array_path, shape)
    names = storage.list_images(folder)
    if not names:
        raise ExploreError("The exploration has no inputs: upload images or an .npy array.")
    if len(shape) != 3 or shape[-1] not in (1, 3, 4):
        raise ExploreError("The model takes inputs of shape %s, not images (height, width, 1 or 3 "
                           "channels): upload an .npy array of samples of that shape instead."
                           % (_shape_text(shape),))
    images, notices = [], []
    for name in names[:MAX_SAMPLES]:
        image, notice = convert_image(os.path.join(storage.images_dir(folder), name), shape)
        images.append(image)
        if notice:
            notices.append("%s: %s." % (name, notice))
    if len(names) > MAX_SAMPLES:
        notices.append("Only the first %d of %d images are explored." % (MAX_SAMPLES, len(names)))
    return np.stack(images), names[:MAX_SAMPLES], notices


def convert_image(path, shape):
    """One image as the model takes it: (float32 (H, W, C) in 0..1, what was converted or "")."""
    from PIL import Image

    height, width, channels = shape
    changes = []
    with Image.open(path) as image:
        image.load()
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
        if image.mode != mode:
            grey = image.mode in ("1", "L", "LA", "I", "I;16", "F")
            changes.append("converted from %s to %s, as the model takes %d channel%s" % (
                "grey" if grey else "colour (%s)" % image.mode,
                {"L": "grey", "RGB": "colour (RGB)", "RGBA": "colour with alpha"}[mode],
                channels, "" if channels == 1 else "s"))
            image = image.convert(mode)
        size = (width or image.width, height or image.height)
        if image.size != size:
            changes.append("resized from %dx%d to %dx%d pixels" % (image.width, image.height,
                                                                   *size))
            image = image.resize(size, Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
    if pixels.ndim == 2:
        pixels = pixels[..., np.newaxis]
    return pixels, "; ".join(changes)


def _load_array(path, shape):
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ExploreError("inputs.npy is not a NumPy array file: %s." % error) from None
    if _fits(array.shape, shape):
        array = array[np.newaxis]
    elif not _fits(array.shape[1:], shape):
        raise ExploreError("The array has shape %s, but the model takes samples of shape %s: give "
                           "an array of shape (N, %s) or one sample." % (
                               _shape_text(array.shape), _shape_text(shape),
                               ", ".join("any" if d is None else str(d) for d in shape)))
    notices = []
    if len(array) > MAX_SAMPLES:
        notices.append("Only the first %d of %d samples are explored." % (MAX_SAMPLES, len(array)))
        array = array[:MAX_SAMPLES]
    names = ["sample %d" % (index + 1) for index in range(len(array))]
    return array.astype(np.float32), names, notices


def _fits(actual, expected):
    return len(actual) == len(expected) and all(e is None or a == e
                                                for a, e in zip(actual, expected))


def _shape_text(shape):
    return "(%s)" % ", ".join("any" if d is None else str(d) for d in shape)


def load_class_names(folder, output_size):
    """The class names of the folder checked against the model's number of outputs, or None.

    Raises:
        ExploreError: their number differs from the model's outputs.
    """
    path = os.path.join(folder, storage.EXPLORE_CLASS_NAMES_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        names = json.load(f)
    if output_size is None:
        raise ExploreError("Class names were given, but the model's output is not one score per "
                           "class; explore it without class names.")
    if len(names) != output_size:
        raise ExploreError("%d class names were given, but the model has %d outputs: give one "
                           "name per output, in order, or none to see class numbers."
                           % (len(names), output_size))
    return names


def class_count(model):
    """The number of classes of a model whose one output is (N, classes), else None."""
    if len(model.outputs) != 1 or len(model.outputs[0].shape) != 2:
        return None
    return model.outputs[0].shape[-1]


# --- the layer graph -------------------------------------------------------------------------

def _graph(model):
    """The Functional graph behind a model: a Sequential keeps one in ``_functional``."""
    return getattr(model, "_functional", None) or model


def _is_model(layer):
    import keras
    return isinstance(layer, keras.Model) and hasattr(_graph(layer), "_nodes_by_depth")


def _graph_nodes(graph):
    """The graph's nodes, inputs first (deepest depth first)."""
    return [node for depth in sorted(graph._nodes_by_depth, reverse=True)
            for node in graph._nodes_by_depth[depth]]


def _kind(layer):
    if _is_model(layer):
        return "model"
    name = type(layer).__name__
    return next((kind for kind, names in KINDS if name in names), "other")


def _json_safe(value, depth=0):
    """A layer config's value as JSON, long values shortened for a tooltip."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value[:MAX_CONFIG_CHARS] if isinstance(value, str) else value
    if depth > 4:
        return "..."
    if isinstance(value, dict):
        return {str(k): _json_safe(v, depth + 1) for k, v in list(value.items())[:40]}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, depth + 1) for v in list(value)[:40]]
    return str(value)[:MAX_CONFIG_CHARS]


def _config(layer):
    try:
        config = dict(layer.get_config())
    except Exception as error:  # a layer's get_config may raise anything
        return {"error": "no configuration: %s" % error}
    config.pop("layers", None)  # a nested model's layers are nodes of their own
    config.pop("input_layers", None)
    config.pop("output_layers", None)
    return _json_safe(config)


def _params(layer):
    try:
        return int(layer.count_params())
    except ValueError:  # not built
        return 0


def _is_filter_layer(layer):
    import keras
    return (isinstance(layer, keras.layers.Conv2D) and not isinstance(
        layer, keras.layers.Conv2DTranspose) and len(getattr(layer, "kernel", ()).shape) == 4)


def architecture(model):
    """The model's layer graph in the contract's format (nodes, edges, totals).

    Nodes are the layers of the model's own graph and of every nested model (``parent``:
    the node of the model containing it; a nested model is also a node of its own), in
    the order the graph computes them; ids are layer paths ("inner/conv2d"). Edges follow
    each layer's inbound nodes: one per (producer, consumer) pair, carrying the shape.
    """
    nodes, edges, seen = [], [], set()

    def add(model, prefix, parent):
        graph = _graph(model)
        ids = {}
        for node in _graph_nodes(graph):
            layer = node.operation
            if id(layer) in ids:
                continue  # a shared layer: one node, its first use's shape
            node_id = prefix + layer.name
            ids[id(layer)] = node_id
            shape = node.outputs[0].shape if node.outputs else ()
            rank = len(shape) - 1
            nodes.append({
                "id": node_id, "name": layer.name, "type": type(layer).__name__,
                "output_shape": str(tuple(shape)),
                "params": _params(layer), "config": _config(layer), "parent": parent,
                "is_model": _is_model(layer), "kind": _kind(layer),
                "has_maps": rank in (2, 3) and not _is_model(layer),
                "has_filters": _is_filter_layer(layer)})
            if _is_model(layer):
                add(layer, node_id + "/", node_id)
        for node in _graph_nodes(graph):
            if node.is_input:
                continue
            target = ids[id(node.operation)]
            for tensor in node.input_tensors:
                source = ids.get(id(tensor._keras_history[0]))
                if source is not None and (source, target) not in seen:
                    seen.add((source, target))
                    edges.append({"source": source, "target": target,
                                  "shape": str(tuple(tensor.shape))})

    add(model, "", None)
    trainable = int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))
    total = _params(model)
    return {"name": model.name, "total_params": total, "trainable_params": trainable,
            "non_trainable_params": total - trainable, "nodes": nodes, "edges": edges}


# --- forward passes ----------------------------------------------------------------------------

def forward_all(model, inputs):
    """Every layer's output for ``inputs``, nested models' layers included.

    Returns:
        (the model's outputs as numpy (first output), {node id: numpy output}) where a
        layer called several times gives its first call's output.
    """
    import tensorflow as tf
    from keras.src.models.functional import operation_fn

    outputs = {}

    def run(model, given, prefix):
        graph = _graph(model)
        tensors = {id(symbolic): computed
                   for symbolic, computed in zip(graph.inputs, tf.nest.flatten(given))}
        for node in _graph_nodes(graph):
            layer = node.operation
            node_id = prefix + layer.name
            if node.is_input:
                outputs.setdefault(node_id, tensors[id(node.outputs[0])])
                continue
            args, kwargs = node.arguments.fill_in(tensors)
            if _is_model(layer):
                result = run(layer, args[0] if len(args) == 1 else list(args), node_id + "/")
            else:
                result = operation_fn(layer, training=False)(*args, **kwargs)
            flat = tf.nest.flatten(result)
            for symbolic, computed in zip(node.outputs, flat):
                tensors[id(symbolic)] = computed
            if len(flat) == 1:
                outputs.setdefault(node_id, flat[0])
        results = [tensors[id(output)] for output in graph.outputs]
        return results[0] if len(results) == 1 else results

    final = run(model, tf.convert_to_tensor(inputs), "")
    final = tf.nest.flatten(final)[0]
    return np.asarray(final), {key: np.asarray(value) for key, value in outputs.items()}


def probabilities(outputs):
    """Class probabilities from a model's outputs (N, classes): as they are when they are
    probabilities already, else their softmax; and whether a softmax was applied."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.shape[-1] == 1:  # one sigmoid unit: the probability of class 1
        p = np.clip(outputs[:, 0], 0, 1)
        return np.stack([1 - p, p], axis=1), False
    sums = outputs.sum(axis=-1)
    if np.all(outputs >= 0) and np.all(np.abs(sums - 1) < 1e-3):
        return outputs, False
    shifted = np.exp(outputs - outputs.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True), True


def predictions(outputs, names, class_names):
    """The contract's predictions: top-5 classes per input, sorted by probability."""
    probs, _ = probabilities(outputs)
    entries = []
    for name, row in zip(names, probs):
        top = np.argsort(-row, kind="stable")[:TOP_PREDICTIONS]
        entries.append({"name": name, "top": [{
            "class_index": int(index),
            "class_name": class_names[index] if class_names else str(int(index)),
            "probability": float(row[index])} for index in top]})
    return {"images": entries}


def scale_maps(maps):
    """uint8 maps, each scaled on its own: from 0 (or its minimum, when negative) to its max."""
    maps = np.asarray(maps, dtype=np.float64)
    flat = maps.reshape(len(maps), -1) if maps.ndim > 1 else maps.reshape(1, -1)
    low = np.minimum(flat.min(axis=1, keepdims=True), 0)
    high = flat.max(axis=1, keepdims=True)
    span = np.where(high > low, high - low, 1)
    return np.round((flat - low) / span * 255).astype(np.uint8).reshape(maps.shape)


def _b64(array):
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.uint8).tobytes()).decode("ascii")


def layer_result(node_id, image_name, output, stats, layer, first_on_input):
    """The contract's layer JSON for one input's output of one layer.

    Args:
        output: the layer's output for this input, (H, W, C), (T, C) or (units,).
        stats: per filter or unit, its mean and fraction of zeros over all inputs.
        layer: the Keras layer (for its filters), or None.
        first_on_input: whether the layer reads the model's input (colour filters).
    """
    output = np.asarray(output, dtype=np.float64)
    result = {"node": node_id, "image": image_name, "shape": [], "activations": "",
              "range": [0.0, 0.0], "stats": stats, "filters": None, "message": None}
    if output.ndim not in (1, 2, 3):
        result["message"] = ("This layer's output has shape %s per input; maps are shown for "
                             "outputs of 1, 2 or 3 dimensions." % (output.shape,))
        return result
    maps = np.moveaxis(output, -1, 0) if output.ndim > 1 else output
    result["shape"] = list(maps.shape)
    result["range"] = [float(output.min()), float(output.max())] if output.size else [0.0, 0.0]
    result["activations"] = _b64(scale_maps(maps) if maps.ndim > 1 else scale_maps(maps[None])[0])
    if layer is not None and _is_filter_layer(layer):
        kernel = np.asarray(layer.kernel.numpy(), dtype=np.float64)  # (kh, kw, c, n)
        if kernel.size <= MAX_FILTER_VALUES:
            filters = np.transpose(kernel, (3, 0, 1, 2))  # (n, kh, kw, c)
            result["filters"] = {"shape": list(filters.shape),
                                 "rgb": bool(first_on_input and filters.shape[-1] == 3),
                                 "data": _b64(_scale_filters(filters))}
    return result


def _scale_filters(filters):
    """Each filter from its minimum (0) to its maximum (255), all its channels on one scale."""
    flat = filters.reshape(len(filters), -1)
    low, high = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    span = np.where(high > low, high - low, 1)
    return np.round((flat - low) / span * 255).astype(np.uint8).reshape(filters.shape)


# --- pictures --------------------------------------------------------------------------------

# A perceptual colour map from dark blue over red to yellow, for heat maps.
_HEAT = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                  [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float64)


def heat_colours(values):
    """uint8 RGB (..., 3) of values in 0..1."""
    position = np.clip(values, 0, 1) * (len(_HEAT) - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, len(_HEAT) - 1)
    weight = (position - low)[..., None]
    return np.round(_HEAT[low] * (1 - weight) + _HEAT[high] * weight).astype(np.uint8)


def input_picture(sample):
    """uint8 (H, W) or (H, W, 3) of one image input, values in 0..1 shown as they are."""
    sample = np.asarray(sample, dtype=np.float64)
    if sample.min() < 0 or sample.max() > 1:  # not 0..1: shown from its minimum to its maximum
        span = sample.max() - sample.min()
        sample = (sample - sample.min()) / (span if span else 1)
    pixels = np.round(sample * 255).astype(np.uint8)
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels[..., :3]


def image_picture(image):
    """uint8 of a float image in input space (a reconstruction), from its minimum to its max."""
    image = np.asarray(image, dtype=np.float64)
    span = image.max() - image.min()
    pixels = np.round((image - image.min()) / (span if span else 1) * 255).astype(np.uint8)
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels[..., :3]


def heat_picture(heat, sample):
    """A heat map (H, W) (or (H, W, C): summed over |channels|) over the input, half and half."""
    heat = np.asarray(heat, dtype=np.float64)
    if heat.ndim == 3:
        heat = np.abs(heat).sum(axis=-1)
    top = np.abs(heat).max()
    colours = heat_colours(np.abs(heat) / (top if top else 1)).astype(np.float64)
    base = input_picture(sample).astype(np.float64)
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=-1)
    return np.round(0.5 * base + 0.5 * colours).astype(np.uint8)


def png_bytes(pixels):
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# --- the explorer --------------------------------------------------------------------------------

class Explorer:
    """One model and its inputs, analysed, answering requests.

    Args:
        folder: the exploration's folder.
        model: the loaded model.
        inputs: float32 (N, ...) as the model takes them.
        names: one name per input.
        class_names: list of str or None.
        notices: what was converted, for the page.
    """

    def __init__(self, folder, model, inputs, names, class_names, notices):
        self.folder, self.model, self.inputs = folder, model, inputs
        self.names, self.class_names, self.notices = list(names), class_names, list(notices)
        self.layers = {}      # node id: layer
        self.first_on_input = set()  # node ids of layers that read the model's input
        self.stats = {}       # node id: [{index, mean, zero_fraction}] over all inputs
        self.outputs = None   # {node id: outputs of all inputs} when they fit in memory
        self._one = (None, None)  # (input index, {node id: output}) of the last one computed
        self._graph = None
        self._cache = {}      # technique objects built once: deconvolution and saliency models
        self._precompute = []  # (node id, input name) of the layer files to write when idle
        self._precompute_bytes = 0

    @classmethod
    def load(cls, folder):
        """Loads model, inputs and class names of a folder; ``ExploreError`` if it cannot."""
        model = load_model(folder)
        inputs, names, notices = load_inputs(folder, input_shape(model))
        class_names = load_class_names(folder, class_count(model))
        return cls(folder, model, inputs, names, class_names, notices)

    def _write(self, file_name, result):
        storage.atomic_write_json(storage.results_path(self.folder, file_name), result)

    def analyse(self):
        """Writes the architecture, the predictions, the inputs as fed, then the ready file."""
        self._graph = architecture(self.model)
        self._write(storage.EXPLORE_ARCHITECTURE_FILE, self._graph)
        self._index_layers(self.model, "")
        final = self._first_pass()
        if class_count(self.model) is not None:
            probs, applied = probabilities(final)
            if applied:
                self.notices.append("The model's outputs are not probabilities: a softmax was "
                                    "applied to show them as such.")
            self._write(storage.EXPLORE_PREDICTIONS_FILE,
                        predictions(final, self.names, self.class_names))
        else:
            self._write(storage.EXPLORE_PREDICTIONS_FILE, {"images": [], "message": (
                "The model's output has shape %s, not one score per class: there are no "
                "predictions to rank." % (tuple(self.model.outputs[0].shape),))})
        images = []
        for index, sample in enumerate(self.inputs):
            drawable = sample.ndim == 3 and sample.shape[-1] in (1, 3, 4)
            if drawable:
                storage.atomic_write_bytes(storage.results_path(self.folder, os.path.join(
                    storage.EXPLORE_INPUT_PNG_DIR, "%d.png" % index)),
                    png_bytes(input_picture(sample)))
            images.append({"name": self.names[index], "png": drawable})
        # the first input's layers first: the page shows it first
        self._precompute = [(node["id"], name) for name in self.names
                            for node in self._graph["nodes"] if node["id"] in self.stats]
        self._write(storage.EXPLORE_READY_FILE, {"notices": self.notices, "images": images})

    def _index_layers(self, model, prefix, reads_input=True):
        """Finds every node's layer, and the layers that read the model's input (the input of
        a nested model that reads it counts too)."""
        graph = _graph(model)
        inputs = {id(tensor) for tensor in graph.inputs}
        for node in _graph_nodes(graph):
            layer = node.operation
            node_id = prefix + layer.name
            if node_id in self.layers:
                continue
            self.layers[node_id] = layer
            if reads_input and not node.is_input and any(id(t) in inputs
                                                         for t in node.input_tensors):
                self.first_on_input.add(node_id)
            if _is_model(layer):
                self._index_layers(layer, node_id + "/", node_id in self.first_on_input)

    def _first_pass(self):
        """Forward passes over all inputs in batches: the model's outputs, every layer's
        statistics (summed batch by batch), and every layer's outputs while they fit in memory."""
        final, kept, kept_bytes = [], [], 0
        sums, zeros, counts = {}, {}, {}
        for start in range(0, len(self.inputs), FIRST_PASS_BATCH):
            out, per_layer = forward_all(self.model, self.inputs[start:start + FIRST_PASS_BATCH])
            final.append(out)
            for key, value in per_layer.items():
                if value.ndim < 2:
                    continue
                flat = value.reshape(-1, value.shape[-1]).astype(np.float64)
                sums[key] = sums.get(key, 0) + flat.sum(axis=0)
                zeros[key] = zeros.get(key, 0) + (flat == 0).sum(axis=0)
                counts[key] = counts.get(key, 0) + len(flat)
            if kept is not None:
                kept_bytes += sum(value.nbytes for value in per_layer.values())
                kept = kept + [per_layer] if kept_bytes <= KEEP_OUTPUTS_BYTES else None
        for key in sums:
            self.stats[key] = [{"index": index, "mean": float(total / counts[key]),
                                "zero_fraction": float(zero / counts[key])}
                               for index, (total, zero) in enumerate(zip(sums[key], zeros[key]))]
        if kept is not None:
            self.outputs = {key: np.concatenate([batch[key] for batch in kept]) for key in kept[0]}
        return np.concatenate(final)

    def _output_of(self, node_id, index):
        if self.outputs is not None:
            return self.outputs[node_id][index]
        if self._one[0] != index:
            self._one = (index, forward_all(self.model, self.inputs[index:index + 1])[1])
        return self._one[1][node_id][0]

    def layer(self, node_id, image_name):
        """Writes (and returns) the layer file of one node for one input."""
        index = self.names.index(image_name)
        if node_id not in self.stats:
            result = {"node": node_id, "image": image_name, "shape": [], "activations": "",
                      "range": [0.0, 0.0], "stats": [], "filters": None,
                      "message": "This layer has no single output to show."}
        else:
            result = layer_result(node_id, image_name, self._output_of(node_id, index),
                                  self.stats[node_id], self.layers.get(node_id),
                                  node_id in self.first_on_input)
        storage.atomic_write_json(storage.layer_path(self.folder, node_id, image_name), result)
        return result

    # --- compute requests ---

    def compute(self, request_id, technique, node_id, image_name, unit):
        """Writes the response of a compute request (and its PNGs) into ``results/compute/``."""
        try:
            index = self.names.index(image_name)
        except ValueError:
            return self._respond(request_id, "failed", "There is no input named %s." % image_name)
        sample = self.inputs[index]
        if sample.ndim != 3:
            return self._respond(request_id, "failed", "The techniques draw images; this model's "
                                 "input is not an image.")
        keys = (["saliency", "deconvolution", "deep_visualization"] + list(ATTRIBUTION_METHODS)
                if technique == "all" else [technique])
        results, problems = [], []
        for key in keys:
            # "all" shows deep visualization of the predicted class, the others at the node
            # when it has feature maps, else at the last layer with maps
            at_node = technique != "all" or (key != "deep_visualization" and node_id is not None
                                             and len(self.layers[node_id].output.shape) == 4)
            try:
                pixels, caption = self._technique(key, node_id if at_node else None, index,
                                                  unit if at_node else None)
            except Exception as error:  # a technique that cannot handle this model says why
                if technique != "all":
                    return self._respond(request_id, "failed", "%s: %s" % (
                        EXPLANATIONS[key][0], _one_line(error)))
                pixels, caption = None, "Not available for this model: %s" % _one_line(error)
                problems.append(key)
            file_name = None
            if pixels is not None:
                file_name = "%s-%s.png" % (request_id, key)
                storage.atomic_write_bytes(storage.compute_path(self.folder, file_name),
                                           png_bytes(pixels))
            title, what, how, misleads = EXPLANATIONS[key]
            results.append({"key": key, "title": title, "what": what, "how": how,
                            "misleads": misleads, "image": file_name, "caption": caption})
        return self._respond(request_id, "done", None, results)

    def _respond(self, request_id, state, message, results=()):
        response = {"state": state, "message": message, "results": list(results)}
        storage.atomic_write_json(storage.compute_path(self.folder, request_id + ".json"), response)
        return response

    def _layer_no(self, node_id, what):
        """The index in ``model.layers`` of a node of the outer model."""
        layer = self.layers.get(node_id)
        if layer is None:
            raise ValueError("there is no layer %s" % node_id)
        for layer_no, candidate in enumerate(self.model.layers):
            if candidate is layer:
                return layer_no
        raise ValueError("%s is computed for layers of the outer model; %s is inside a nested "
                         "model" % (what, node_id))

    def _spatial_layer_no(self, node_id):
        """The node's layer number (it must have feature maps), or the last layer with maps."""
        if node_id is not None:
            shape = self.layers[node_id].output.shape
            if len(shape) != 4:
                raise ValueError("it needs a layer with feature maps (height, width, channels); "
                                 "%s has output shape %s" % (node_id, tuple(shape)))
            return self._layer_no(node_id, "This technique")
        for layer_no in range(len(self.model.layers) - 1, -1, -1):
            layer = self.model.layers[layer_no]
            if len(layer.output.shape) == 4 and type(layer).__name__ != "InputLayer":
                return layer_no
        raise ValueError("the model has no layer with feature maps")

    def _class_caption(self, index):
        probs, _ = probabilities(self.model(self.inputs[index:index + 1], training=False))
        predicted = int(np.argmax(probs[0]))
        name = self.class_names[predicted] if self.class_names else str(predicted)
        return "for class %s (%.2f)" % (name, probs[0][predicted])

    def _technique(self, key, node_id, index, unit):
        """(uint8 picture, caption) of one technique for input ``index``."""
        from custom_keras.techniques import attribution
        from custom_keras.techniques.deconvolution import DeconvolutionModel
        from custom_keras.techniques.deep_visualization import deep_visualization
        from custom_keras.techniques.saliency import SaliencyModel

        sample = self.inputs[index]
        batch = self.inputs[index:index + 1]
        if key == "saliency":
            if "saliency" not in self._cache:
                self._cache["saliency"] = SaliencyModel(self.model)
            maps, _, _ = self._cache["saliency"](batch)
            return heat_picture(maps[0][..., 0] / 255.0, sample), self._class_caption(index)
        if key == "deconvolution":
            layer_no = self._spatial_layer_no(node_id)
            cache_key = ("deconvolution", layer_no, unit)
            if cache_key not in self._cache:
                self._cache[cache_key] = DeconvolutionModel(
                    self.model, layer_no, feat_map_amount=None if unit is not None else 1,
                    feat_map_nos=[unit] if unit is not None else None)
            reconstruction, layer_name, map_no = self._cache[cache_key](batch)[0][0]
            return image_picture(reconstruction), "map %d of %s" % (map_no, layer_name)
        if key == "deep_visualization":
            if node_id is None or node_id == self._graph["nodes"][-1]["id"]:
                layer_no = len(self.model.layers) - 1
                probs, _ = probabilities(self.model(batch, training=False))
                chosen = int(np.argmax(probs[0])) if unit is None else unit
            else:
                layer_no = self._layer_no(node_id, "Deep visualization")
                chosen = unit or 0
            shape = self.model.layers[layer_no].output.shape
            index_of_unit = chosen if len(shape) == 2 else (shape[1] // 2, shape[2] // 2, chosen)
            image, layer_name, _, value = deep_visualization(
                self.model, [(layer_no, index_of_unit)], seed=0, **DEEP_VISUALIZATION)[0]
            return image_picture(image), "unit %d of %s (activation %.3g)" % (
                chosen, layer_name, value)
        if key in ATTRIBUTION_METHODS:
            function = getattr(attribution, key)
            kwargs = {}
            if key in ("grad_cam", "grad_cam_plus_plus", "score_cam", "guided_grad_cam"):
                kwargs["layer_no"] = self._spatial_layer_no(node_id)
            maps = function(self.model, batch, **kwargs)
            caption = self._class_caption(index)
            if "layer_no" in kwargs:
                caption += " at %s" % self.model.layers[kwargs["layer_no"]].name
            return heat_picture(maps[0], sample), caption
        raise ValueError("unknown technique %s" % key)

    # --- serving ---

    def serve(self, idle_s, clock=time.monotonic, sleep=time.sleep):
        """Answers requests until none came for ``idle_s`` seconds; precomputes meanwhile."""
        done = set()
        last = clock()
        while True:
            pending = self._pending_requests(done)
            if pending:
                for request_id, request in pending:
                    done.add(request_id)
                    self.handle(request_id, request)
                last = clock()
            elif self._precompute:
                self._precompute_next()
            elif clock() - last > idle_s:
                return
            else:
                sleep(REQUEST_POLL_S)

    def _pending_requests(self, done):
        folder = os.path.join(self.folder, storage.EXPLORE_REQUESTS_DIR)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            request_id, extension = os.path.splitext(name)
            if extension != ".json" or name.startswith(".") or request_id in done:
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    found.append((os.stat(f.fileno()).st_mtime_ns, request_id, json.load(f)))
            except (OSError, ValueError):
                done.add(request_id)
        return [(request_id, request) for _, request_id, request in sorted(found)]

    def handle(self, request_id, request):
        """Answers one request of the server (a layer, or a technique), unless answered before."""
        if not isinstance(request, dict):
            return
        try:
            self._handle(request_id, request)
        except Exception as error:  # one bad request must not end the job
            traceback.print_exc()
            if request.get("kind") == "compute":
                self._respond(request_id, "failed", "The job could not compute it: %s"
                              % _one_line(error))

    def _handle(self, request_id, request):
        if request.get("kind") == "layer":
            node_id, image_name = request.get("node"), request.get("image")
            if image_name in self.names and not os.path.exists(
                    storage.layer_path(self.folder, node_id, image_name)):
                self.layer(node_id, image_name)
        elif request.get("kind") == "compute":
            if not os.path.exists(storage.compute_path(self.folder, request_id + ".json")):
                self.compute(request_id, request.get("technique"), request.get("node"),
                             request.get("image"), request.get("unit"))

    def _precompute_next(self):
        """Writes the next layer file no one asked for, until PRECOMPUTE_BYTES are written (a
        large model's layers are computed when asked for, not all onto the disk)."""
        node_id, image_name = self._precompute.pop(0)
        path = storage.layer_path(self.folder, node_id, image_name)
        if not os.path.exists(path):
            self.layer(node_id, image_name)
            self._precompute_bytes += os.path.getsize(path)
            if self._precompute_bytes >= PRECOMPUTE_BYTES:
                self._precompute = []


def _one_line(error):
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return (text or type(error).__name__)[:400]


def read_idle_s(folder):
    try:
        with open(os.path.join(folder, storage.EXPLORE_SETTINGS_FILE), encoding="utf-8") as f:
            return float(json.load(f)["idle_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_IDLE_S


def write_failure(folder, message):
    storage.atomic_write_json(storage.results_path(folder, storage.EXPLORE_FAILURE_FILE),
                              {"message": message})


def main(folder):
    """The job: analyse the folder's model, then answer requests until idle (see the module)."""
    # Each run of a job has a uid of its own: a later run must be able to replace these files.
    os.umask(0)
    folder = os.path.abspath(folder)
    try:
        explorer = Explorer.load(folder)
        explorer.analyse()
    except ExploreError as error:
        write_failure(folder, str(error))
        print("explore: %s" % error, file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception as error:
        traceback.print_exc()
        write_failure(folder, "The analysis failed: %s: %s" % (type(error).__name__,
                                                               _one_line(error)))
        sys.exit(1)
    print("explore: ready; %d inputs, %d layers" % (len(explorer.names), len(explorer.layers)),
          flush=True)
    explorer.serve(read_idle_s(folder))
    print("explore: idle, exiting", flush=True)
