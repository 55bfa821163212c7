"""The deconvolutional network of Zeiler & Fergus: which image pattern drives a feature map.

For the chosen layer, every requested feature map keeps only its maximum entry
(everything else, other maps included, is zeroed) and that signal is mapped back
to pixel space through the layers below in reverse: max-unpooling with the
switches of this image's forward pass, ReLU, and transposed convolution with the
layer's own filters, strides and padding (biases are not used).

The deconvolutional network is derived automatically for a plain stack of
``Conv2D``, ``MaxPooling2D`` and ReLU layers (``Dropout`` and linear activations
pass through). Any other model needs ``custom_keras_model_info``.

All requested maps of all images go through the reverse pass as ONE batch:
the (image, map) pairs lie on the batch axis, image-major.
"""
import keras
import numpy as np

from custom_keras.techniques.common import check_images, get_layer, single_input

SUPPORTED_LAYERS = ("Conv2D (relu or no activation, no dilation or groups), MaxPooling2D, ReLU (without "
                    "max_value, negative_slope or threshold), Activation('relu'/'linear') and Dropout, "
                    "channels_last")


def _is_activation(function, name):
    return getattr(function, "__name__", None) == name


def _reverse_step(layer):
    """How the reverse pass treats ``layer``: "conv", "unpool", "relu" or "pass"; None if unsupported."""
    if isinstance(layer, keras.layers.Dropout):
        return "pass"
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return None
    if isinstance(layer, keras.layers.Conv2D):
        plain = tuple(layer.dilation_rate) == (1, 1) and layer.groups == 1
        if plain and (_is_activation(layer.activation, "relu") or _is_activation(layer.activation, "linear")):
            return "conv"
        return None
    if isinstance(layer, keras.layers.MaxPooling2D):
        return "unpool"
    if isinstance(layer, keras.layers.ReLU):
        plain = not layer.max_value and not layer.negative_slope and not layer.threshold
        return "relu" if plain else None
    if isinstance(layer, keras.layers.Activation):
        if _is_activation(layer.activation, "relu"):
            return "relu"
        if _is_activation(layer.activation, "linear"):
            return "pass"
    return None


def _describe(model, layer):
    return "layer %d (%s, %s)" % (model.layers.index(layer), layer.name, type(layer).__name__)


def _conv_stack(model, layer):
    """The layers from the model input (exclusive) up to ``layer`` (not an InputLayer), bottom first.

    Follows the chosen layer's inputs back to the model input, so layers that do
    not feed it (other branches, the classifier above) do not matter.

    Raises:
        ValueError: a layer below ``layer`` (or ``layer`` itself) is not part of a
            plain convolutional stack; the message says to pass custom_keras_model_info.
    """
    producers = {id(l.output): l for l in model.layers}
    model_input = single_input(model)
    stack = []
    current = layer
    while True:
        if _reverse_step(current) is None:
            raise ValueError(
                "feat_map_layer_no: cannot derive a deconvolutional network automatically: %s "
                "is below or at the chosen layer, and only %s are supported. Pass "
                "custom_keras_model_info=(deconv_model, layer_map, update) for this model."
                % (_describe(model, current), SUPPORTED_LAYERS))
        stack.append(current)
        tensor = current.input  # one tensor: every supported layer has a single input
        if tensor is model_input:
            break
        if id(tensor) not in producers:
            raise ValueError(
                "feat_map_layer_no: cannot derive a deconvolutional network automatically: the "
                "input of %s does not come from a layer of this model. Pass "
                "custom_keras_model_info=(deconv_model, layer_map, update) for this model."
                % _describe(model, current))
        current = producers[id(tensor)]
    return stack[::-1]


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


def _check_selection(layer, feat_map_amount, feat_map_nos):
    """Check the feature map selection against the number of maps of ``layer``."""
    maps = layer.output.shape[-1]
    if (feat_map_amount is None) == (feat_map_nos is None):
        raise ValueError("Give exactly one of feat_map_amount (the top N maps by maximum activation, "
                         "-1 for all) and feat_map_nos (a list of map numbers); got feat_map_amount=%r, "
                         "feat_map_nos=%r" % (feat_map_amount, feat_map_nos))
    if feat_map_amount is not None:
        if not isinstance(feat_map_amount, (int, np.integer)) or isinstance(feat_map_amount, bool):
            raise TypeError("feat_map_amount must be an int, got %r" % (feat_map_amount,))
        if feat_map_amount != -1 and not 1 <= feat_map_amount <= maps:
            raise ValueError("feat_map_amount=%d is out of range: layer %s has %d feature maps; use "
                             "1..%d, or -1 for all" % (feat_map_amount, layer.name, maps, maps))
        return
    if not isinstance(feat_map_nos, (list, tuple, np.ndarray)) or len(feat_map_nos) == 0:
        raise TypeError("feat_map_nos must be a non-empty list of feature map numbers, got %r"
                        % (feat_map_nos,))
    for number in feat_map_nos:
        if not isinstance(number, (int, np.integer)) or isinstance(number, bool):
            raise TypeError("feat_map_nos must hold ints, got %r" % (number,))
        if not 0 <= number < maps:
            raise ValueError("feat_map_nos: map number %d is out of range: layer %s has feature maps "
                             "0..%d" % (number, layer.name, maps - 1))
    if len(set(int(n) for n in feat_map_nos)) != len(feat_map_nos):
        raise ValueError("feat_map_nos has repeated map numbers: %r" % (list(feat_map_nos),))


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
    layer = get_layer(model, feat_map_layer_no, "feat_map_layer_no")
    if isinstance(layer, keras.layers.InputLayer) or len(layer.output.shape) != 4:
        raise ValueError(
            "feat_map_layer_no=%d is %s, which has no feature maps (its output has shape %s); choose a "
            "Conv2D, MaxPooling2D or activation layer of the convolutional part" % (
                feat_map_layer_no, _describe(model, layer), tuple(layer.output.shape)))
    if custom_keras_model_info is None:
        _conv_stack(model, layer)
    else:
        _check_custom_info(feat_map_layer_no, custom_keras_model_info)
    _check_selection(layer, feat_map_amount, feat_map_nos)


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


def _entries_to_signal(entries, shape):
    """The dense (rows, h, w, channels) signal of ``(y, x, c, value)`` entries, one per row."""
    import tensorflow as tf

    y, x, c, value = entries
    rows = tf.shape(value)[0]
    indices = tf.stack([tf.range(rows), y, x, c], axis=1)
    return tf.scatter_nd(indices, value, tf.concat([[rows], tf.cast(shape, tf.int32)], axis=0))


class DeconvolutionModel:
    """Images -> deconvolutional reconstructions of feature maps of one layer; built once.

    It reads the model's current weights at every call, so one instance serves a
    whole training run.

    Args:
        model: a built Keras model (TensorFlow backend).
        feat_map_layer_no: index into ``model.layers`` of the layer whose feature maps are shown.
        feat_map_amount: the top N feature maps by maximum activation, per image; -1 for all.
        feat_map_nos: a list of feature map numbers (instead of ``feat_map_amount``).
        custom_keras_model_info: the thesis' tuple ``(deconv_model, layer_map, update)``:
            ``deconv_model`` a Keras model that maps feature maps back to the input;
            ``layer_map`` a dict {original layer number: ``deconv_model`` layer number},
            where the deconvolutional layer is the one that reverses the original layer;
            ``update(model)`` is called before every deconvolution and returns a new
            ``(deconv_model, layer_map)`` (e.g. with the newly trained filters) or None
            to keep the current pair. The processed feature maps enter the input of
            ``deconv_model.layers[layer_map[feat_map_layer_no]]``; the output of its last
            layer is the reconstruction. It gets one row per (image, feature map) pair,
            image-major, so any image-specific unpooling is up to ``update``.
        compiled: run the forward pass, the selection and the reverse pass as one
            ``tf.function`` graph: the first call traces it (tens of ms), later calls run
            2-3 times faster than eagerly. False suits a single call.
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
        if custom_keras_model_info is None:
            self.stack = _conv_stack(model, self.layer)
            pools = [l for l in self.stack if isinstance(l, keras.layers.MaxPooling2D)]
            self._pool_index = {id(l): i for i, l in enumerate(pools)}
            outputs = [self.layer.output] + [l.input for l in pools]
        else:
            outputs = [self.layer.output]
        self.forward_model = keras.Model(single_input(model), outputs)
        self._deconvolve = self._forward_and_reverse
        if compiled:
            self._deconvolve = tf.function(self._forward_and_reverse, reduce_retracing=True,
                                           autograph=False)

    def __call__(self, images):
        """Reconstruct the selected feature maps of every image.

        Args:
            images: float32 (N, H, W, C), preprocessed for the model.

        Returns:
            A list (one per image) of ``[(float32 (H, W, C) reconstruction, layer_name,
            feat_map_no), ...]``, ordered by descending maximum activation for
            ``feat_map_amount`` and as given for ``feat_map_nos``.
        """
        images = check_images(self.model, images)
        if self.custom_info is None:
            map_nos, reconstructions = self._deconvolve(images, self._input_shapes(images.shape))
        else:
            map_nos, signal = self._deconvolve(images, None)
            reconstructions = self._custom_reverse(signal)
        reconstructions = np.asarray(reconstructions, dtype=np.float32)
        map_nos = np.asarray(map_nos)
        per_image = map_nos.shape[1]
        return [[(reconstructions[i * per_image + k], self.layer.name, int(map_nos[i, k]))
                 for k in range(per_image)] for i in range(len(images))]

    def _input_shapes(self, images_shape):
        """Each stack layer's input shape (without the batch axis) for images of this size."""
        shapes = []
        shape = (None,) + tuple(images_shape[1:])
        for layer in self.stack:
            shapes.append(tuple(shape[1:]))
            shape = layer.compute_output_shape(shape)
        return tuple(shapes)

    def _forward_and_reverse(self, images, input_shapes):
        """Returns the chosen map numbers (N, K) and the reconstructions (N*K, H, W, C); for a
        custom deconvolutional model, the processed feature maps instead of the reconstructions."""
        import tensorflow as tf

        outputs = self.forward_model(images, training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        map_nos, entries = self._select_entries(outputs[0])
        # The dense signal: for the custom model, and for the automatic one where the
        # graph needs it (it starts from the entries and drops the signal if it can).
        signal = _entries_to_signal(entries, tf.shape(outputs[0])[1:])
        if self.custom_info is not None:
            return map_nos, signal
        return map_nos, self._reverse_stack(signal, list(outputs[1:]), input_shapes, entries)

    def _select_entries(self, feature_maps):
        """Choose the maps per image and each one's maximum entry.

        Returns:
            map_nos int32 (N, K) and the entries ``(y, x, c, value)``, each (N*K,): row
            i*K + k is the maximum entry of map ``map_nos[i, k]`` of image i.
        """
        import tensorflow as tf

        shape = tf.shape(feature_maps)
        images, width, maps = shape[0], shape[2], shape[3]
        flat = tf.reshape(tf.transpose(feature_maps, [0, 3, 1, 2]), [images, maps, -1])
        if self.feat_map_nos is None:
            # top_k lists equal maxima by ascending map number, so the order is stable.
            map_nos = tf.math.top_k(tf.reduce_max(flat, axis=-1), k=self.amount).indices
        else:
            map_nos = tf.tile(tf.constant([self.feat_map_nos], dtype=tf.int32), [images, 1])
        chosen = tf.gather(flat, map_nos, batch_dims=1)
        position = tf.reshape(tf.argmax(chosen, axis=-1, output_type=tf.int32), [-1])
        maximum = tf.reshape(tf.reduce_max(chosen, axis=-1), [-1])
        return map_nos, (position // width, position % width, tf.reshape(map_nos, [-1]), maximum)

    def _reverse_stack(self, signal, pool_inputs, input_shapes, entries=None):
        """Map the processed feature maps back to the input: unpool, ReLU, transposed convolution.

        ``input_shapes`` holds each stack layer's input shape without the batch axis.
        ``entries``, when given, are the signal's one non-zero entry per row as
        ``(y, x, c, value)`` (see ``_select_entries``): unpooling and ReLU keep a single
        entry per row, so up to the first convolution only the entries are followed, and
        that transposed convolution places one filter per row instead of convolving.
        """
        import tensorflow as tf

        pairs = tf.shape(signal)[0]
        per_image = pairs // tf.shape(pool_inputs[0])[0] if pool_inputs else None
        for layer, input_shape in reversed(list(zip(self.stack, input_shapes))):
            step = _reverse_step(layer)
            pool_input = pool_inputs[self._pool_index[id(layer)]] if step == "unpool" else None
            if entries is not None:
                y, x, c, value = entries
                if step == "relu" or (step == "conv" and _is_activation(layer.activation, "relu")):
                    entries = y, x, c, tf.nn.relu(value)
                if step == "unpool":
                    entries = self._unpool_entries(entries, pool_input, layer, per_image)
                elif step == "conv":
                    size = tuple(layer.compute_output_shape((None,) + tuple(input_shape))[1:3])
                    signal = _place_filters(entries, tf.cast(layer.kernel, signal.dtype), layer.strides,
                                            layer.padding, size, input_shape)
                    entries = None
                if step != "conv" and layer is self.stack[0]:
                    signal = _entries_to_signal(entries, input_shape)
                continue
            if step == "relu":
                signal = tf.nn.relu(signal)
            elif step == "conv":
                if _is_activation(layer.activation, "relu"):
                    signal = tf.nn.relu(signal)
                signal = tf.nn.conv2d_transpose(
                    signal, tf.cast(layer.kernel, signal.dtype), output_shape=[pairs] + list(input_shape),
                    strides=layer.strides, padding=layer.padding.upper())
            elif step == "unpool":
                signal = self._unpool(signal, pool_input, layer, per_image)
        return signal

    @staticmethod
    def _unpool_entries(entries, pool_input, layer, per_image):
        """Max-unpooling of one entry per row: it moves to where this image's maximum was."""
        import tensorflow as tf

        y, x, c, value = entries
        _, switches = tf.nn.max_pool_with_argmax(
            pool_input, ksize=layer.pool_size, strides=layer.strides, padding=layer.padding.upper(),
            include_batch_in_index=False)
        image = tf.range(tf.shape(value)[0]) // per_image
        # A switch indexes within one image, over (H, W, C) of the pool's input.
        switch = tf.cast(tf.gather_nd(switches, tf.stack([image, y, x, c], axis=1)), tf.int32)
        shape = tf.shape(pool_input)
        width, channels = shape[2], shape[3]
        return switch // (width * channels), switch // channels % width, c, value

    @staticmethod
    def _unpool(signal, pool_input, layer, per_image):
        """Max-unpooling: put each entry where this image's forward pass found the maximum."""
        import tensorflow as tf

        _, switches = tf.nn.max_pool_with_argmax(
            pool_input, ksize=layer.pool_size, strides=layer.strides, padding=layer.padding.upper(),
            include_batch_in_index=False)
        input_shape = tf.shape(pool_input, out_type=tf.int64)
        image_size = tf.reduce_prod(input_shape[1:])
        pairs = tf.shape(signal, out_type=tf.int64)[0]
        # Switches index within one image; row p of the batch starts at p * image_size.
        targets = tf.repeat(switches, per_image, axis=0) + tf.range(pairs)[:, None, None, None] * image_size
        unpooled = tf.math.unsorted_segment_sum(
            tf.reshape(signal, [-1]), tf.reshape(targets, [-1]), pairs * image_size)
        return tf.reshape(unpooled, tf.concat([[pairs], input_shape[1:]], axis=0))

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
