"""The deconvolutional network of Zeiler & Fergus: which input pattern drives a feature map.

For the chosen layer, every requested feature map keeps only its maximum entry
(everything else, other maps included, is zeroed) and that signal is mapped back
to the input through the layers below in reverse. Each layer is reversed by its
transpose, except ReLU:

- convolutions (any rank, strided, ``padding="same"``, dilated, depthwise,
  separable) by the transposed convolution with their own filters (no bias);
- max pooling by max-unpooling with the switches of this input's forward pass;
- average pooling and global average pooling by spreading each value evenly
  over its window; zero padding by cropping, cropping by padding, flatten and
  reshape by reshaping back, up-sampling by summing;
- BatchNormalization (inference: ``gamma * (x - mean) / sqrt(var + eps) + beta``)
  by its transpose, i.e. multiplying by ``gamma / sqrt(var + eps)`` per channel
  and dropping the shift, like a convolution's bias. Not its inverse: dividing by
  that factor would blow up channels the network scales down, and the
  deconvnet reverses every linear map by its transpose;
- Add by sending the signal to every branch, Concatenate by splitting it,
  Dropout and noise layers (identity at inference) by passing it;
- ReLU (inside a layer, as ``ReLU()`` or ``Activation("relu")``) by ReLU of the
  signal, as the deconvnet does, not by the forward pass's gradient mask;
- a model used as a layer (a base model with a new head) by reversing its own
  layers.

That is the gradient of ``sum(feature maps * signal)`` with respect to the input
with ReLU's backward step replaced by ReLU: the reverse pass is TensorFlow's
backward pass with the ReLUs swapped while it is traced. Its top, from the
chosen layer down to the first Conv2D through max pooling, ReLU and Dropout
only (the usual case), is cheaper by hand: each row's single entry is ReLU'd
and unpooled, and that convolution's filter is placed at it instead of a dense
transposed convolution of a signal that is zero but for one entry; the
backward pass starts at that convolution's input (or is not needed at all). A layer whose reverse
is not one of the above (tanh, sigmoid, softmax and other non-linear
activations, recurrent layers, attention, custom layers) makes the automatic
network impossible; the error names the layer and asks for
``custom_keras_model_info``.

All requested maps of all inputs go through the reverse pass as ONE batch: the
(input, map) pairs lie on the batch axis, input-major. Feature maps may have
any number of axes before the channels: (H, W, C) for images, (T, C) for
sequences.
"""
import contextlib

import keras
import numpy as np

from custom_keras.techniques.common import (check_images, get_layer, single_input,
                                            swapped_activations)

SUPPORTED_LAYERS = ("convolutions (Conv, DepthwiseConv, SeparableConv, ConvTranspose), pooling "
                    "(max, average, global), BatchNormalization, ZeroPadding, Cropping, UpSampling, "
                    "Flatten, Reshape, Permute, Add, Subtract, Average, Concatenate, Dropout and "
                    "noise layers, Rescaling, ReLU and Activation('relu'/'linear'), Dense, and "
                    "models made of these")

# Layers whose reverse is their transpose (the gradient of their linear part).
_TRANSPOSED_LAYERS = tuple(getattr(keras.layers, name) for name in (
    "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
    "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D", "Dense",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
    "AveragePooling3D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
    "GlobalAveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
    "BatchNormalization", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D",
    "Cropping2D", "Cropping3D", "UpSampling1D", "UpSampling2D", "UpSampling3D", "Flatten",
    "Reshape", "Permute", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
    "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Add",
    "Subtract", "Average", "Concatenate", "InputLayer", "Identity", "Rescaling")
    if hasattr(keras.layers, name))


def _activation_name(function):
    return getattr(function, "__name__", None)


def _plain_relu_layer(layer):
    return (isinstance(layer, keras.layers.ReLU) and not layer.max_value
            and not layer.negative_slope and not layer.threshold)


def _why_not_reversible(layer):
    """None if the deconvnet can reverse ``layer`` (nested models aside), else the reason."""
    if _plain_relu_layer(layer):
        return None
    activation = _activation_name(getattr(layer, "activation", None))
    if isinstance(layer, keras.layers.Activation):
        return None if activation in ("relu", "linear") else "it applies %s" % activation
    if not isinstance(layer, _TRANSPOSED_LAYERS):
        return "the deconvolutional network has no reverse for a %s layer" % type(layer).__name__
    if activation not in (None, "relu", "linear"):
        return "its activation is %s, which has no deconvnet reverse" % activation
    return None


def _describe(model, layer, inside=None):
    if inside is not None:
        return "layer %r (%s) inside %s" % (layer.name, type(layer).__name__, inside)
    if layer in model.layers:
        return "layer %d (%s, %s)" % (model.layers.index(layer), layer.name, type(layer).__name__)
    return "layer %r (%s)" % (layer.name, type(layer).__name__)


def _operations_below(tensor):
    """The operations (layers) that compute ``tensor``, from it down to the inputs."""
    seen, order, pending = set(), [], [tensor]
    while pending:
        history = getattr(pending.pop(), "_keras_history", None)
        if history is None:
            continue
        operation = history.operation
        key = (id(operation), history.node_index)
        if key in seen:
            continue
        seen.add(key)
        order.append(operation)
        pending.extend(operation._inbound_nodes[history.node_index].input_tensors)
    return order


def _reverse_path(model, layer):
    """Every layer the reverse pass from ``layer``'s output goes through, nested models' own
    layers included.

    Follows the chosen layer's inputs back to the model input, so layers that do
    not feed it (other branches, the classifier above) do not matter.

    Raises:
        ValueError: a layer below ``layer`` (or ``layer`` itself) cannot be reversed;
            the message names it and says to pass custom_keras_model_info.
    """
    path = []

    def visit(tensor, inside):
        for operation in _operations_below(tensor):
            if isinstance(operation, keras.Model):
                for output in operation.outputs:
                    visit(output, _describe(model, operation, inside))
                continue
            reason = _why_not_reversible(operation)
            if reason:
                raise ValueError(
                    "feat_map_layer_no: cannot derive a deconvolutional network automatically: "
                    "%s is below or at the chosen layer, and %s (supported: %s). Pass "
                    "custom_keras_model_info=(deconv_model, layer_map, update) for this model."
                    % (_describe(model, operation, inside), reason, SUPPORTED_LAYERS))
            path.append(operation)

    visit(layer.output, None)
    return path


def _relu_users(layers):
    """The layers whose ReLU the reverse pass swaps: (with a relu activation, ReLU layers)."""
    activations = [l for l in layers if _activation_name(getattr(l, "activation", None)) == "relu"]
    return activations, [l for l in layers if _plain_relu_layer(l)]


def _deconvnet_relu(x):
    """ReLU forward; backward, the deconvnet's ReLU of the signal (not the forward mask)."""
    import tensorflow as tf

    @tf.custom_gradient
    def relu(x):
        return tf.nn.relu(x), tf.nn.relu
    return relu(x)


@contextlib.contextmanager
def _deconvnet_relus(activation_layers, relu_layers):
    """Temporarily give these layers the deconvnet ReLU; Keras reads them when a layer is called."""
    for layer in relu_layers:
        layer.call = _deconvnet_relu
    try:
        with swapped_activations(activation_layers, _deconvnet_relu):
            yield
    finally:
        for layer in relu_layers:
            del layer.call


def _check_custom_info(feat_map_layer_no, custom_keras_model_info):
    """Check the thesis' (deconv keras model, layer map dict, update function) tuple."""
    if not isinstance(custom_keras_model_info, tuple) or len(custom_keras_model_info) != 3:
        raise TypeError(
            "custom_keras_model_info must be a tuple (deconv_model, layer_map, update), got %r"
            % (custom_keras_model_info,))
    deconv_model, layer_map, update = custom_keras_model_info
    if not callable(update):
        raise TypeError("custom_keras_model_info[2] (update) must be callable: update(model) -> "
                        "(deconv_model, layer_map), got %r" % (update,))
    _check_deconv_model(deconv_model, layer_map, feat_map_layer_no)


def _check_deconv_model(deconv_model, layer_map, feat_map_layer_no):
    if not isinstance(deconv_model, keras.Model):
        raise TypeError("custom_keras_model_info: the deconvolutional model must be a keras.Model, "
                        "got %r" % (deconv_model,))
    if not isinstance(layer_map, dict):
        raise TypeError("custom_keras_model_info: the layer map must be a dict {original layer "
                        "number: deconvolutional model layer number}, got %r" % (layer_map,))
    if feat_map_layer_no not in layer_map:
        raise ValueError("custom_keras_model_info: the layer map has no entry for feat_map_layer_no=%d "
                         "(it maps layers %s)" % (feat_map_layer_no, sorted(layer_map)))
    start = layer_map[feat_map_layer_no]
    if not isinstance(start, (int, np.integer)) or not 0 <= start < len(deconv_model.layers):
        raise ValueError("custom_keras_model_info: layer_map[%d]=%r is not a layer number of the "
                         "deconvolutional model (0..%d)" % (feat_map_layer_no, start,
                                                          len(deconv_model.layers) - 1))


def check_deconvolution_selection(feat_map_layer_no, feat_map_amount=None, feat_map_nos=None):
    """Raise a clear error for a layer number or selection that is wrong whatever the model."""
    if not isinstance(feat_map_layer_no, (int, np.integer)) or isinstance(feat_map_layer_no, bool):
        raise TypeError("feat_map_layer_no must be an int index into model.layers, got %r"
                        % (feat_map_layer_no,))
    if (feat_map_amount is None) == (feat_map_nos is None):
        raise ValueError("Give exactly one of feat_map_amount (the top N maps by maximum activation, "
                         "-1 for all) and feat_map_nos (a list of map numbers); got feat_map_amount=%r, "
                         "feat_map_nos=%r" % (feat_map_amount, feat_map_nos))
    if feat_map_amount is not None:
        if not isinstance(feat_map_amount, (int, np.integer)) or isinstance(feat_map_amount, bool):
            raise TypeError("feat_map_amount must be an int, got %r" % (feat_map_amount,))
        if feat_map_amount != -1 and feat_map_amount < 1:
            raise ValueError("feat_map_amount=%d is out of range: use 1 or more, or -1 for all"
                             % feat_map_amount)
        return
    if not isinstance(feat_map_nos, (list, tuple, np.ndarray)) or len(feat_map_nos) == 0:
        raise TypeError("feat_map_nos must be a non-empty list of feature map numbers, got %r"
                        % (feat_map_nos,))
    for number in feat_map_nos:
        if not isinstance(number, (int, np.integer)) or isinstance(number, bool):
            raise TypeError("feat_map_nos must hold ints, got %r" % (number,))
        if number < 0:
            raise ValueError("feat_map_nos: map number %d is out of range: map numbers start at 0"
                             % number)
    if len(set(int(n) for n in feat_map_nos)) != len(feat_map_nos):
        raise ValueError("feat_map_nos has repeated map numbers: %r" % (list(feat_map_nos),))


def _check_selection(layer, feat_map_amount, feat_map_nos):
    """Check the feature map selection against the number of maps of ``layer``."""
    maps = layer.output.shape[-1]
    if feat_map_amount is not None:
        if feat_map_amount != -1 and not 1 <= feat_map_amount <= maps:
            raise ValueError("feat_map_amount=%d is out of range: layer %s has %d feature maps; use "
                             "1..%d, or -1 for all" % (feat_map_amount, layer.name, maps, maps))
        return
    for number in feat_map_nos:
        if not 0 <= number < maps:
            raise ValueError("feat_map_nos: map number %d is out of range: layer %s has feature maps "
                             "0..%d" % (number, layer.name, maps - 1))


def check_deconvolution_args(model, feat_map_layer_no, feat_map_amount=None, feat_map_nos=None,
                             custom_keras_model_info=None):
    """Raise a clear error if the deconvolution arguments cannot work for ``model``.

    Args:
        model: a built Keras model.
        feat_map_layer_no: index into ``model.layers`` of the layer whose feature maps are shown.
        feat_map_amount: the top N feature maps by maximum activation; -1 for all.
        feat_map_nos: a list of feature map numbers (instead of ``feat_map_amount``).
        custom_keras_model_info: ``(deconv_model, layer_map, update)`` for models whose
            deconvolutional network cannot be derived automatically (see ``DeconvolutionModel``).

    Raises:
        TypeError, ValueError: naming the argument at fault.
    """
    check_deconvolution_selection(feat_map_layer_no, feat_map_amount, feat_map_nos)
    layer = get_layer(model, feat_map_layer_no, "feat_map_layer_no")
    output = getattr(layer, "output", None) if not isinstance(layer, keras.Model) else layer.outputs[0]
    if isinstance(layer, keras.layers.InputLayer) or not isinstance(output, keras.KerasTensor) \
            or len(output.shape) < 3:
        raise ValueError(
            "feat_map_layer_no=%d is %s, which has no feature maps (its output has shape %s); choose a "
            "convolutional, pooling or activation layer of the convolutional part" % (
                feat_map_layer_no, _describe(model, layer),
                tuple(output.shape) if isinstance(output, keras.KerasTensor) else "several"))
    if custom_keras_model_info is None:
        _reverse_path(model, layer)
    else:
        _check_custom_info(feat_map_layer_no, custom_keras_model_info)
    _check_selection(layer, feat_map_amount, feat_map_nos)


def _dense_signal(entries, shape):
    """The signal (rows, ..., maps) of ``(position, channel, value)`` entries, one per row, for
    feature maps of ``shape`` (N, ..., maps)."""
    import tensorflow as tf

    position, channel, value = entries
    positions = tf.reduce_prod(shape[1:-1])
    signal = (tf.one_hot(position, positions)[:, :, None] * tf.one_hot(channel, shape[-1])[:, None, :]
              * value[:, None, None])
    return tf.reshape(signal, tf.concat([[-1], shape[1:]], axis=0))


def _producer(tensor):
    """The (operation, its input tensors) that computed ``tensor``, or (None, [])."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None, []
    operation = history.operation
    return operation, list(operation._inbound_nodes[history.node_index].input_tensors)


def _entry_step(layer):
    """How the top of the reverse pass carries one entry per row through ``layer``: "pass",
    "relu", "unpool" or "conv" (which places its filter); None where it stops."""
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return None
    activation = _activation_name(getattr(layer, "activation", None))
    if isinstance(layer, (keras.layers.Dropout, keras.layers.GaussianNoise,
                          keras.layers.GaussianDropout)):
        return "pass"
    if _plain_relu_layer(layer) or (isinstance(layer, keras.layers.Activation) and activation == "relu"):
        return "relu"
    if isinstance(layer, keras.layers.Activation) and activation == "linear":
        return "pass"
    if type(layer) is keras.layers.MaxPooling2D:
        return "unpool"
    if (type(layer) is keras.layers.Conv2D and tuple(layer.dilation_rate) == (1, 1)
            and layer.groups == 1 and activation in ("relu", "linear")):
        return "conv"
    return None


def _top_steps(model, layer):
    """The layers from the chosen one down to the first Conv2D, when every one of them keeps
    a single entry per row (ReLU, max pooling, Dropout) and the sizes are fixed; else [].

    Returns:
        ``[(layer, step, its input tensor), ...]``, top first, ending with the Conv2D.
    """
    if len(layer.output.shape) != 4:
        return []
    steps, tensor = [], layer.output
    while True:
        operation, inputs = _producer(tensor)
        step = _entry_step(operation) if isinstance(operation, keras.layers.Layer) else None
        if step is None or len(inputs) != 1 or None in tuple(inputs[0].shape[1:]):
            return []
        steps.append((operation, step, inputs[0]))
        if step == "conv":
            return steps
        tensor = inputs[0]


def _place_filters(entries, kernel, strides, padding, output_size, input_shape):
    """``conv2d_transpose`` of a signal that has one non-zero entry per row.

    The transposed convolution of one entry ``v`` at ``(y, x, c)`` is the filter
    ``kernel[:, :, :, c]`` times ``v``, placed with its corner at ``(y * stride - pad,
    x * stride - pad)``: one scatter for all rows instead of a dense convolution.

    Args:
        entries: ``(y, x, c, value)``, each of shape (rows,): row r of the signal is zero
            but for ``value[r]`` at ``(y[r], x[r], c[r])``.
        kernel: the Conv2D's kernel (kh, kw, in_channels, out_channels).
        strides: the Conv2D's ``(sy, sx)``.
        padding: the Conv2D's ``"valid"`` or ``"same"``.
        output_size: the Conv2D's output ``(h, w)``, where the entries lie.
        input_shape: the Conv2D's input shape ``(H, W, in_channels)`` (ints).

    Returns:
        (rows, H, W, in_channels), equal to ``tf.nn.conv2d_transpose`` of the signal.
    """
    import tensorflow as tf

    y, x, c, value = entries
    kh, kw = int(kernel.shape[0]), int(kernel.shape[1])
    (sy, sx), (height, width, channels), (h, w) = strides, input_shape, output_size
    rows = tf.shape(value)[0]
    # (rows, kh, kw, in_channels): each row's filter scaled by its entry.
    patches = tf.transpose(tf.gather(kernel, c, axis=3), [3, 0, 1, 2]) * value[:, None, None, None]
    if padding == "same":  # as the forward convolution pads: the smaller half before
        pad_top = max((h - 1) * sy + kh - height, 0) // 2
        pad_left = max((w - 1) * sx + kw - width, 0) // 2
    else:
        pad_top = pad_left = 0
    # Scatter into a canvas that holds every filter whole, then cut the input's window.
    canvas_h = max((h - 1) * sy + kh, pad_top + height)
    canvas_w = max((w - 1) * sx + kw, pad_left + width)
    dy, dx = np.meshgrid(np.arange(kh, dtype=np.int32), np.arange(kw, dtype=np.int32), indexing="ij")
    row_index = tf.broadcast_to(tf.range(rows)[:, None, None], [rows, kh, kw])
    indices = tf.stack([row_index, (y * sy)[:, None, None] + dy, (x * sx)[:, None, None] + dx], axis=-1)
    canvas = tf.scatter_nd(indices, patches, tf.stack([rows, canvas_h, canvas_w, channels]))
    if (canvas_h, canvas_w) == (height, width):
        return canvas
    return canvas[:, pad_top:pad_top + height, pad_left:pad_left + width, :]


def _unpool_entries(entries, pool_input, layer, per_image):
    """Max-unpooling of one entry per row: it moves to where this input's maximum was."""
    import tensorflow as tf

    y, x, c, value = entries
    _, switches = tf.nn.max_pool_with_argmax(
        pool_input, ksize=layer.pool_size, strides=layer.strides, padding=layer.padding.upper(),
        include_batch_in_index=False)
    image = tf.range(tf.shape(value)[0]) // per_image
    # A switch indexes within one input, over (H, W, C) of the pool's input.
    switch = tf.cast(tf.gather_nd(switches, tf.stack([image, y, x, c], axis=1)), tf.int32)
    shape = tf.shape(pool_input)
    width, channels = shape[2], shape[3]
    return switch // (width * channels), switch // channels % width, c, value


class DeconvolutionModel:
    """Inputs -> deconvolutional reconstructions of feature maps of one layer; built once.

    It reads the model's current weights at every call, so one instance serves a
    whole training run.

    Args:
        model: a built Keras model (TensorFlow backend) with one input.
        feat_map_layer_no: index into ``model.layers`` of the layer whose feature maps are shown.
        feat_map_amount: the top N feature maps by maximum activation, per input; -1 for all.
        feat_map_nos: a list of feature map numbers (instead of ``feat_map_amount``).
        custom_keras_model_info: the thesis' tuple ``(deconv_model, layer_map, update)``:
            ``deconv_model`` a Keras model that maps feature maps back to the input;
            ``layer_map`` a dict {original layer number: ``deconv_model`` layer number},
            where the deconvolutional layer is the one that reverses the original layer;
            ``update(model)`` is called before every deconvolution and returns a new
            ``(deconv_model, layer_map)`` (e.g. with the newly trained filters) or None
            to keep the current pair. The processed feature maps enter the input of
            ``deconv_model.layers[layer_map[feat_map_layer_no]]``; the output of its last
            layer is the reconstruction. It gets one row per (input, feature map) pair,
            input-major, so any input-specific unpooling is up to ``update``.
        compiled: run the forward pass, the selection and the reverse pass as one
            ``tf.function`` graph: the first call traces it, later calls run faster than
            eagerly. False suits a single call.
    """

    def __init__(self, model, feat_map_layer_no, feat_map_amount=None, feat_map_nos=None,
                 custom_keras_model_info=None, compiled=True):
        import tensorflow as tf

        if keras.backend.backend() != "tensorflow":
            raise RuntimeError("the deconvolutional network needs the TensorFlow backend of Keras, "
                               "this is %r" % keras.backend.backend())
        check_deconvolution_args(model, feat_map_layer_no, feat_map_amount, feat_map_nos,
                                 custom_keras_model_info)
        self.model = model
        self.feat_map_layer_no = feat_map_layer_no
        self.layer = model.layers[feat_map_layer_no]
        maps = self.layer.output.shape[-1]
        self.amount = None if feat_map_nos is not None else (maps if feat_map_amount == -1 else feat_map_amount)
        self.feat_map_nos = None if feat_map_nos is None else [int(n) for n in feat_map_nos]
        self.custom_info = custom_keras_model_info
        model_input = single_input(model)
        # The top of the reverse pass, down to the first convolution, follows one entry per
        # row and places that convolution's filter (cheap); the rest is a backward pass.
        self._top = [] if custom_keras_model_info is not None else _top_steps(model, self.layer)
        pool_inputs = [tensor for _, step, tensor in self._top if step == "unpool"]
        self.forward_model = keras.Model(model_input, [self.layer.output] + pool_inputs)
        start = self._top[-1][2] if self._top else self.layer.output
        self._below = None if start is model_input else keras.Model(model_input, start)
        if custom_keras_model_info is None:
            self._relu_layers = _relu_users(_reverse_path(model, self.layer))
        self._deconvolve = self._forward_and_reverse
        if compiled:
            self._deconvolve = tf.function(self._forward_and_reverse, reduce_retracing=True,
                                           autograph=False)

    def __call__(self, images):
        """Reconstruct the selected feature maps of every input.

        Args:
            images: float32 (N, ...) as the model's input, preprocessed for the model.

        Returns:
            A list (one per input) of ``[(float32 reconstruction shaped like one input,
            layer_name, feat_map_no), ...]``, ordered by descending maximum activation for
            ``feat_map_amount`` and as given for ``feat_map_nos``.
        """
        images = check_images(self.model, images)
        map_nos, reconstructions = self._deconvolve(images)
        if self.custom_info is not None:
            reconstructions = self._custom_reverse(reconstructions)
        reconstructions = np.asarray(reconstructions, dtype=np.float32)
        map_nos = np.asarray(map_nos)
        per_image = map_nos.shape[1]
        return [[(reconstructions[i * per_image + k], self.layer.name, int(map_nos[i, k]))
                 for k in range(per_image)] for i in range(len(images))]

    def _forward_and_reverse(self, images):
        """Returns the chosen map numbers (N, K) and the reconstructions (N*K, ...); for a
        custom deconvolutional model, the processed feature maps instead of the reconstructions."""
        import tensorflow as tf

        outputs = keras.tree.flatten(self.forward_model(images, training=False))
        feature_maps = tf.cast(outputs[0], tf.float32)
        map_nos, entries = self._select_entries(feature_maps)
        if self._top:
            signal = self._top_reverse(entries, outputs[1:], tf.shape(map_nos)[1],
                                       tf.shape(feature_maps)[2])
        else:
            signal = _dense_signal(entries, tf.shape(feature_maps))
        if self.custom_info is not None or self._below is None:
            return map_nos, signal
        pairs = tf.repeat(images, tf.shape(map_nos)[1], axis=0)
        return map_nos, self._reverse(pairs, signal)

    def _top_reverse(self, entries, pool_inputs, per_image, width):
        """Unpool and ReLU the single entry of every row down to the first convolution, and
        place that convolution's filter: the signal at the convolution's input."""
        import tensorflow as tf

        position, channel, value = entries
        entries = position // width, position % width, channel, value
        pool_inputs = iter(pool_inputs)
        for layer, step, tensor in self._top:
            y, x, c, value = entries
            if step == "relu" or (step == "conv" and _activation_name(layer.activation) == "relu"):
                entries = y, x, c, tf.nn.relu(value)
            if step == "unpool":
                entries = _unpool_entries(entries, next(pool_inputs), layer, per_image)
            elif step == "conv":
                return _place_filters(entries, tf.cast(layer.kernel, value.dtype), layer.strides,
                                      layer.padding, tuple(layer.output.shape[1:3]),
                                      tuple(tensor.shape[1:]))

    def _reverse(self, pairs, signal):
        """The signal mapped back to the input through the layers below the top's: the
        backward pass with the deconvnet's ReLU, one row per (input, map) pair, input-major."""
        import tensorflow as tf

        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(pairs)
            with _deconvnet_relus(*self._relu_layers):
                below = self._below(pairs, training=False)
            # Each row depends on its own input only: one gradient gives every row its own.
            total = tf.reduce_sum(tf.cast(below, signal.dtype) * signal)
        return tape.gradient(total, pairs)

    def _select_entries(self, feature_maps):
        """Choose the maps per input and each one's maximum entry.

        Returns:
            map_nos int32 (N, K) and the entries ``(position, channel, value)``, each (N*K,):
            row i*K + k is the maximum of map ``map_nos[i, k]`` of input i, at ``position``
            in the flattened axes before the channels.
        """
        import tensorflow as tf

        shape = tf.shape(feature_maps)
        images, maps = shape[0], shape[-1]
        # (N, maps, positions): every map of every input as one row.
        flat = tf.transpose(tf.reshape(feature_maps, [images, -1, maps]), [0, 2, 1])
        if self.feat_map_nos is None:
            # top_k lists equal maxima by ascending map number, so the order is stable.
            map_nos = tf.math.top_k(tf.reduce_max(flat, axis=-1), k=self.amount).indices
        else:
            map_nos = tf.tile(tf.constant([self.feat_map_nos], dtype=tf.int32), [images, 1])
        chosen = tf.gather(flat, map_nos, batch_dims=1)
        position = tf.reshape(tf.argmax(chosen, axis=-1, output_type=tf.int32), [-1])
        maximum = tf.reshape(tf.reduce_max(chosen, axis=-1), [-1])
        return map_nos, (position, tf.reshape(map_nos, [-1]), maximum)

    def _custom_reverse(self, signal):
        """Feed the processed feature maps to the user's deconvolutional model."""
        deconv_model, layer_map, update = self.custom_info
        updated = update(self.model)
        if updated is not None:
            if not isinstance(updated, tuple) or len(updated) != 2:
                raise TypeError("custom_keras_model_info: update(model) must return (deconv_model, "
                                "layer_map) or None, got %r" % (updated,))
            deconv_model, layer_map = updated
            _check_deconv_model(deconv_model, layer_map, self.feat_map_layer_no)
            self.custom_info = (deconv_model, layer_map, update)
        start = deconv_model.layers[layer_map[self.feat_map_layer_no]]
        reverse_model = keras.Model(start.input, deconv_model.layers[-1].output)
        return reverse_model(signal, training=False)


def deconvolution(model, images, feat_map_layer_no, feat_map_amount=None, feat_map_nos=None,
                  custom_keras_model_info=None):
    """Deconvolutional-network reconstructions (Zeiler & Fergus) of feature maps of one layer.

    Args:
        model: a built Keras model (TensorFlow backend).
        images: float32 (N, H, W, C), preprocessed for the model.
        feat_map_layer_no: index into ``model.layers`` of the layer whose feature maps are shown.
        feat_map_amount: the top N feature maps by maximum activation, per image; -1 for all.
        feat_map_nos: a list of feature map numbers (instead of ``feat_map_amount``).
        custom_keras_model_info: ``(deconv_model, layer_map, update)``, see ``DeconvolutionModel``.

    Returns:
        A list (one per image) of ``[(float32 (H, W, C) reconstruction in input space,
        layer_name, feat_map_no), ...]``.

    Runs eagerly, which suits one call; keep a ``DeconvolutionModel`` for repeated calls.
    """
    return DeconvolutionModel(model, feat_map_layer_no, feat_map_amount, feat_map_nos,
                              custom_keras_model_info, compiled=False)(images)
