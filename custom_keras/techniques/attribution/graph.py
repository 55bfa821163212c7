"""Running a model layer by layer: the walk the attribution methods build their graphs on.

A Functional model (a Sequential wraps one) is a graph of nodes; walking it node by
node, and into nested models (a base model used as a layer), lets a method see every
layer's inputs and outputs, change what flows backward through a ReLU, or send
relevance back layer by layer. Nothing on the model is changed: the one exception,
an output layer whose squashing activation cannot be left out by computing its
linear part here, has its activation swapped only while it is called, by
``common._linear_activation``, which puts it back also when the call fails.
"""
import weakref

import keras
import numpy as np
import tensorflow as tf
from keras.src.layers.convolutional.base_conv import BaseConv
from keras.src.models.functional import operation_fn

from custom_keras.techniques.common import (_is_softmax_layer, _linear_activation, _squashes,
                                            check_images, get_layer, single_input)

# model -> {method key: concrete function}: each graph is traced once per model and
# reads the model's variables, so it follows training without retracing.
_GRAPHS = weakref.WeakKeyDictionary()


def compiled(model, key, function, signature):
    """``function`` traced once for ``model`` with a fixed input signature (any batch size)."""
    graphs = _GRAPHS.setdefault(model, {})
    if key not in graphs:
        graphs[key] = tf.function(function, input_signature=signature,
                                  autograph=False).get_concrete_function()
    return graphs[key]


def _graph_of(model):
    """The Functional graph behind a model: a Sequential keeps one in ``_functional``."""
    return getattr(model, "_functional", None) or model


def is_nested_model(layer):
    return isinstance(layer, keras.Model) and hasattr(_graph_of(layer), "_nodes_by_depth")


def _producing_node(tensor):
    operation, node_index, _ = tensor._keras_history
    return operation._inbound_nodes[node_index]


def score_node(model):
    """The node whose output is the model's class scores, inside nested models too."""
    outputs = _graph_of(model).outputs
    if len(outputs) != 1:
        raise ValueError("attribution needs a model with one output, this one has %d" % len(outputs))
    if len(outputs[0].shape) != 2:
        raise ValueError("attribution needs a model whose output is one score per class, shape "
                         "(N, classes); this one's output has shape %s" % (tuple(outputs[0].shape),))
    node = _producing_node(outputs[0])
    while is_nested_model(node.operation):
        node = _producing_node(_graph_of(node.operation).outputs[0])
    return node


def is_kernel_layer(layer):
    """Dense and Conv1D/2D/3D: the layers whose linear part ``linear`` computes."""
    return isinstance(layer, (keras.layers.Dense, BaseConv))


def broadcast_bias(layer, bias):
    """A Dense or convolution layer's bias shaped to add to its outputs."""
    if isinstance(layer, keras.layers.Dense):
        return bias
    shape = ((1,) * (layer.rank + 1) + (layer.filters,) if layer.data_format == "channels_last"
             else (1, layer.filters) + (1,) * layer.rank)
    return keras.ops.reshape(bias, shape)


def linear(layer, inputs, kernel, bias):
    """A Dense or convolution layer's pre-activation with the given kernel and bias (or None)."""
    if isinstance(layer, keras.layers.Dense):
        outputs = keras.ops.matmul(inputs, kernel)
    else:
        outputs = layer.convolution_op(inputs, kernel)
    return outputs if bias is None else outputs + broadcast_bias(layer, bias)


def call(layer, args, kwargs):
    """The layer called as in inference (dropout off, batch normalisation on its moving statistics)."""
    return operation_fn(layer, training=False)(*args, **kwargs)


def call_before_squash(layer, args, kwargs):
    """The layer's output with its softmax (or a model output's sigmoid) left out."""
    if _is_softmax_layer(layer, True):
        return args[0]
    if not _squashes(layer, True):
        return call(layer, args, kwargs)
    if is_kernel_layer(layer):
        return linear(layer, args[0], layer.kernel, layer.bias if layer.use_bias else None)
    with _linear_activation(layer):
        return call(layer, args, kwargs)


def walk(model, inputs, visit):
    """Run ``model`` on ``inputs`` node by node.

    Args:
        model: a built Keras model.
        inputs: the computed input tensor (or list of them).
        visit: ``visit(node, layer, args, kwargs) -> outputs`` computes each layer's
            outputs (nested models are walked, not visited).

    Returns:
        ``(outputs, tensors)``: the list of computed outputs, and a dict from
        ``id(symbolic tensor)`` to computed tensor for the top-level graph.
    """
    graph = _graph_of(model)
    tensors = {id(symbolic): computed
               for symbolic, computed in zip(graph.inputs, tf.nest.flatten(inputs))}
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            args, kwargs = node.arguments.fill_in(tensors)
            layer = node.operation
            if is_nested_model(layer):
                outputs, _ = walk(layer, args[0] if len(args) == 1 else list(args), visit)
            else:
                outputs = visit(node, layer, args, kwargs)
            for symbolic, computed in zip(node.outputs, tf.nest.flatten(outputs)):
                tensors[id(symbolic)] = computed
    return [tensors[id(output)] for output in graph.outputs], tensors


def layer_output(model, layer_no):
    """The symbolic output of ``model.layers[layer_no]`` in the model's own graph (a nested
    model's ``output`` is the one inside it), a key into ``walk``'s tensors."""
    layer = model.layers[layer_no]
    outputs = [node.outputs for nodes in _graph_of(model)._nodes_by_depth.values() for node in nodes
               if node.operation is layer]
    if len(outputs) != 1 or len(outputs[0]) != 1:
        raise ValueError("layer %d (%s) must be called once in the model and have one output"
                         % (layer_no, layer.name))
    return outputs[0][0]


def scores_visit(model):
    """A ``visit`` that computes every layer as usual and the output before its softmax."""
    scoring = score_node(model)

    def visit(node, layer, args, kwargs):
        if node is scoring:
            return call_before_squash(layer, args, kwargs)
        return call(layer, args, kwargs)
    return visit


def chosen_scores(scores, classes):
    """Each image's score of its class: ``classes[i]``, or the predicted class where it is -1."""
    predicted = tf.argmax(scores, axis=-1, output_type=tf.int32)
    chosen = tf.where(classes < 0, predicted, classes)
    return tf.gather(scores, chosen, axis=1, batch_dims=1), chosen


def is_int(value):
    """Whether ``value`` is an int (numpy's too), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def spatial_layer_no(model, layer_no, argument="layer_no"):
    """``layer_no``, or the last layer with a spatial output (N, h, w, channels) when None."""
    if layer_no is None:
        for layer_no in range(len(model.layers) - 1, -1, -1):
            layer = model.layers[layer_no]
            if not isinstance(layer, keras.layers.InputLayer) and len(layer.output.shape) == 4:
                return layer_no
        raise ValueError("the model has no layer with a spatial output (N, height, width, channels)")
    layer = get_layer(model, layer_no, argument)
    if len(layer.output.shape) != 4:
        raise ValueError("%s=%d (%s) has output shape %s; it needs a spatial output "
                         "(N, height, width, channels)" % (argument, layer_no, layer.name,
                                                          tuple(layer.output.shape)))
    return layer_no


def class_indices(class_index, count, classes, labels):
    """The class to explain for each of ``count`` images as int32, -1 meaning the predicted class.

    Args:
        class_index: None (predicted), an int (that class) or "label" (``labels``).
        count: the number of images.
        classes: the number of classes the model scores.
        labels: None, or the true classes: ints (N,) or one-hot (N, classes).
    """
    if class_index is None:
        return np.full(count, -1, dtype=np.int32)
    if isinstance(class_index, str):
        if class_index != "label":
            raise ValueError('class_index must be None, an int or "label", got %r' % class_index)
        if labels is None:
            raise ValueError('class_index="label" needs the true classes: pass labels=')
        labels = np.asarray(labels)
        if labels.ndim == 2:
            labels = np.argmax(labels, axis=-1)
        if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.number):
            raise ValueError("labels must be %d class numbers or one-hot rows (%d, %d), got shape %s"
                             % (count, count, classes, labels.shape))
        indices = labels.astype(np.int64)
    elif is_int(class_index):
        indices = np.full(count, int(class_index), dtype=np.int64)
    else:
        raise TypeError('class_index must be None, an int or "label", got %r' % (class_index,))
    if np.any(indices < 0) or np.any(indices >= classes):
        raise ValueError("class numbers must be in 0..%d, got %s"
                         % (classes - 1, sorted(set(indices.tolist()))))
    return indices.astype(np.int32)


def prepare(model, images, class_index, labels):
    """``(images float32, classes int32 (N,))`` checked against the model, -1 meaning predicted."""
    images = check_images(model, images)
    score_node(model)  # one output of class scores, or a clear error
    classes = _graph_of(model).outputs[0].shape[-1]
    return images, class_indices(class_index, len(images), classes, labels)


def signature(model, *extra):
    """The input signature of a method graph: images (any batch size), classes, then ``extra``."""
    shape = (None,) + tuple(single_input(model).shape[1:])
    return [tf.TensorSpec(shape, tf.float32), tf.TensorSpec((None,), tf.int32)] + list(extra)


def resize(maps, images):
    """(N, h, w) maps resized bilinearly to the images' height and width."""
    return tf.image.resize(maps[..., tf.newaxis], tf.shape(images)[1:3], method="bilinear")[..., 0]
