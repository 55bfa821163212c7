"""Training health: cheap statistics of a training run and the rules that turn them into alerts.

The rules are pure functions over numbers and arrays; ``HealthChecks`` in
``custom_keras.callbacks`` feeds them, writes the statistics and the alerts and
keeps the schedule. ``HealthProbe`` computes the statistics that need the
network (per-layer gradient norms, dead ReLU units) inside the training step.

How the gradients are had cheaply: the probe wraps the model's ``train_step``
once per model, and every ``interval`` training steps (a ``tf.cond`` on the
optimizer's step counter, so the other steps run one comparison more and
nothing else) it takes the first ``sample_size`` samples of that step's own
batch, computes the loss and its gradients on them with the model in inference
mode (no dropout, no batch-norm statistics moved), and the outputs of the ReLU
layers on the whole batch (forward only: dead means silent for every sample of
a training batch, and 32 samples would call many live units dead), and stores
the per-layer norms and dead fractions in variables. The callback reads those
variables every ``interval`` batches: one small transfer, no Python-side
forward pass and no labels of its own, and real training data rather than a
fixed sample. A separate ``tf.function`` on a stored batch would
need the script to hand over labelled data, which the callbacks never see.
"""
import math
import weakref

import keras
import tensorflow as tf

NAN_LOSS = "nan_loss"
EXPLODING_GRADIENTS = "exploding_gradients"
VANISHING_GRADIENTS = "vanishing_gradients"
DEAD_UNITS = "dead_units"
OVERFITTING = "overfitting"
LOSS_NOT_DECREASING = "loss_not_decreasing"
ALERT_KINDS = (NAN_LOSS, EXPLODING_GRADIENTS, VANISHING_GRADIENTS, DEAD_UNITS, OVERFITTING,
               LOSS_NOT_DECREASING)

# What to try, per alert kind, in plain words.
ADVICE = {
    NAN_LOSS: "Lower the learning rate (10x), clip gradients (clipnorm=1.0 in the optimizer), "
              "and check the data for NaN or infinite values; a log or division in a custom "
              "loss can also produce NaN.",
    EXPLODING_GRADIENTS: "Lower the learning rate, clip gradients (clipnorm=1.0 in the "
                         "optimizer), or add batch normalization; check that the inputs are "
                         "scaled to small values.",
    VANISHING_GRADIENTS: "Use ReLU (or a relative of it) instead of sigmoid or tanh in hidden "
                         "layers, a He or Glorot initializer, batch normalization, or skip "
                         "connections; fewer layers also help.",
    DEAD_UNITS: "Lower the learning rate, use LeakyReLU or ELU, or an initializer and bias "
                "that start the units active (a He initializer and zero bias).",
    OVERFITTING: "Stop earlier (keras.callbacks.EarlyStopping), add dropout or weight decay, "
                 "use more training data or data augmentation, or a smaller network.",
    LOSS_NOT_DECREASING: "Raise the learning rate (10x), check that the labels match the loss "
                         "(one-hot for categorical_crossentropy, integers for "
                         "sparse_categorical_crossentropy), and that the inputs are scaled.",
}


class Thresholds:
    """When each alert is raised; every value has a default from the issue's table.

    Args:
        exploding_norm: exploding_gradients when the largest layer gradient norm is above this.
        exploding_growth: or when that largest norm grew this many times since the first
            measurement of the epoch.
        vanishing_ratio: vanishing_gradients when first-layer norm / last-layer norm is below
            this ...
        vanishing_norm: ... and the first-layer norm is below this.
        dead_fraction: dead_units when at least this fraction of a ReLU layer's units (a
            convolutional layer's filters) is zero for every sample of a training batch.
        overfitting_epochs: overfitting when the validation loss rose this many epochs in a
            row while the training loss fell.
        plateau_fraction: loss_not_decreasing when the smoothed loss did not improve over this
            last fraction of the batches ...
        plateau_min_epochs: ... checked from this many epochs done on ...
        plateau_min_delta: ... where an improvement is a drop by more than this fraction of
            the best smoothed loss before.
    """

    def __init__(self, exploding_norm=1e3, exploding_growth=10.0, vanishing_ratio=1e-3,
                 vanishing_norm=1e-4, dead_fraction=0.5, overfitting_epochs=2,
                 plateau_fraction=0.3, plateau_min_epochs=2, plateau_min_delta=0.01):
        for name, value in (("exploding_norm", exploding_norm),
                            ("exploding_growth", exploding_growth),
                            ("vanishing_ratio", vanishing_ratio),
                            ("vanishing_norm", vanishing_norm),
                            ("plateau_min_delta", plateau_min_delta)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError("%s must be a number >= 0, got %r" % (name, value))
        for name, value in (("dead_fraction", dead_fraction),
                            ("plateau_fraction", plateau_fraction)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not 0 < value <= 1:
                raise ValueError("%s must be a fraction in (0, 1], got %r" % (name, value))
        for name, value in (("overfitting_epochs", overfitting_epochs),
                            ("plateau_min_epochs", plateau_min_epochs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError("%s must be a whole number >= 1, got %r" % (name, value))
        self.exploding_norm = float(exploding_norm)
        self.exploding_growth = float(exploding_growth)
        self.vanishing_ratio = float(vanishing_ratio)
        self.vanishing_norm = float(vanishing_norm)
        self.dead_fraction = float(dead_fraction)
        self.overfitting_epochs = overfitting_epochs
        self.plateau_fraction = float(plateau_fraction)
        self.plateau_min_epochs = plateau_min_epochs
        self.plateau_min_delta = float(plateau_min_delta)

    def as_dict(self):
        return dict(vars(self))


# --- statistics ------------------------------------------------------------------


def nonfinite_metrics(logs):
    """Names of the scalar values in ``logs`` that are NaN or infinite, in order."""
    names = []
    for name, value in (logs or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):  # not a scalar
            continue
        if not math.isfinite(number):
            names.append(name)
    return names


def batch_loss(average, previous_average, batches_done):
    """One batch's loss from Keras' running epoch averages after ``batches_done`` and before."""
    if batches_done <= 1:
        return average
    return average * batches_done - previous_average * (batches_done - 1)


def smooth(values, weight=0.9):
    """Exponential moving average of ``values`` (TensorBoard's smoothing), bias-corrected."""
    smoothed, last, debias = [], 0.0, 1.0
    for value in values:
        last = weight * last + (1 - weight) * value
        debias *= weight
        smoothed.append(last / (1 - debias))
    return smoothed


# --- rules: each returns whether its alert is active, and the numbers it saw ------------


def exploding_gradients(norms, first_largest_of_epoch, thresholds):
    """(active, largest norm): the largest layer norm above ``exploding_norm``, or grown
    ``exploding_growth`` times since the epoch's first measurement (``first_largest_of_epoch``)."""
    finite = [n for n in norms if math.isfinite(n)]
    if not finite:
        return False, float("nan")  # NaN is nan_loss's alert
    largest = max(finite)
    grew = (first_largest_of_epoch is not None and first_largest_of_epoch > 0
            and largest >= thresholds.exploding_growth * first_largest_of_epoch)
    return largest > thresholds.exploding_norm or grew, largest


def vanishing_gradients(norms, thresholds):
    """(active, first/last ratio) of the first and last layers with weights."""
    if len(norms) < 2 or not all(math.isfinite(n) for n in (norms[0], norms[-1])):
        return False, float("nan")
    first, last = norms[0], norms[-1]
    ratio = first / last if last > 0 else (0.0 if first == 0 else float("inf"))
    return ratio < thresholds.vanishing_ratio and first < thresholds.vanishing_norm, ratio


def dead_layers(fractions_by_layer, thresholds):
    """{layer: fraction} of the ReLU layers whose dead fraction reaches ``dead_fraction``."""
    return {layer: fraction for layer, fraction in fractions_by_layer.items()
            if fraction >= thresholds.dead_fraction}


def overfitting(train_losses, val_losses, thresholds):
    """True when the last ``overfitting_epochs`` epochs each raised the validation loss and
    lowered the training loss (both lists one value per epoch, in order)."""
    epochs = thresholds.overfitting_epochs
    if len(val_losses) <= epochs or len(train_losses) <= epochs:
        return False
    val, train = val_losses[-epochs - 1:], train_losses[-epochs - 1:]
    return (all(b > a for a, b in zip(val, val[1:]))
            and all(b < a for a, b in zip(train, train[1:])))


def loss_not_decreasing(smoothed_losses, epochs_done, thresholds):
    """True when, ``plateau_min_epochs`` epochs in, the smoothed loss of the last
    ``plateau_fraction`` of the batches never went below the best before it by more than
    ``plateau_min_delta`` of that best."""
    if epochs_done < thresholds.plateau_min_epochs:
        return False
    values = [v for v in smoothed_losses if math.isfinite(v)]
    split = int(round(len(values) * (1 - thresholds.plateau_fraction)))
    if split < 1 or split >= len(values):
        return False
    best_before = min(values[:split])
    return min(values[split:]) >= best_before - thresholds.plateau_min_delta * abs(best_before)


class AlertGate:
    """Decides which alerts are written: an alert (kind and layer) once when it becomes active,
    again only after it has cleared, and at most ``per_epoch`` times an epoch.

    Args:
        per_epoch: the most times one alert is written in one epoch.
    """

    def __init__(self, per_epoch=3):
        self.per_epoch = per_epoch
        self.active = set()
        self.written = {}

    def new_epoch(self):
        self.written = {}

    def update(self, key, active):
        """Record whether ``key`` is active now; True when it should be written."""
        if not active:
            self.active.discard(key)
            return False
        if key in self.active or self.written.get(key, 0) >= self.per_epoch:
            return False
        self.active.add(key)
        self.written[key] = self.written.get(key, 0) + 1
        return True


# --- the probe inside the training step ------------------------------------------------


def is_relu(layer):
    """Whether the layer's output passes through a ReLU (its activation or a ReLU layer)."""
    if isinstance(layer, keras.layers.ReLU):
        return True
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", None) == "relu"


class HealthProbe:
    """Per-layer gradient norms and dead-ReLU fractions, measured inside the training step.

    Wraps ``model.train_step`` (see the module docstring) and rebuilds the training
    function; built once per model (``HealthProbe.of``), a later ``fit`` reuses it. A
    step it cannot trace trains without it, with the error in ``failure``. ``start`` turns it on for a
    fit and ``enabled`` off after, so a model trained later without the health checks pays
    one comparison a step.

    Args:
        model: a built, compiled Keras model with one output.
        sample_size: the number of samples of the step's batch the gradients are measured
            on; dead units are measured on the whole batch.
    """

    _by_model = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model, sample_size=32):
        """The model's probe, built at the first call: a new probe would wrap the step again
        and retrace it (seconds) at every ``fit``. ``sample_size`` is the first call's."""
        probe = cls._by_model.get(model)
        if probe is None:
            probe = cls._by_model[model] = cls(model, sample_size)
        return probe

    def __init__(self, model, sample_size=32):
        if len(model.outputs) != 1:
            raise ValueError("gradient norms and dead units need a model with one output, "
                             "this one has %d" % len(model.outputs))
        self.model = model
        self.sample_size = sample_size
        self.layers = [layer for layer in model.layers if layer.trainable_weights]
        self.layer_names = [layer.name for layer in self.layers]
        relu_layers = [layer for layer in model.layers if is_relu(layer)]
        self.relu_names = [layer.name for layer in relu_layers]
        self._relu_model = (keras.Model(model.inputs, [layer.output for layer in relu_layers])
                            if relu_layers else None)
        self.interval = tf.Variable(1, dtype=tf.int64, trainable=False)
        self.origin = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.enabled = tf.Variable(False, trainable=False)
        # the run's step of the latest measurement (not the optimizer's)
        self.step = tf.Variable(-1, dtype=tf.int64, trainable=False)
        self.norms = tf.Variable(tf.zeros(len(self.layers)), trainable=False)
        self.dead = tf.Variable(tf.zeros(max(len(relu_layers), 1)), trainable=False)
        self.failure = None  # why the training step could not be traced with the probe
        original = model.train_step

        def train_step(data):
            try:
                measured = self._measure_when_due(data)
            except Exception as error:  # a model the probe cannot trace trains without it
                self.failure = error
                return original(data)
            with tf.control_dependencies([measured]):
                return original(data)

        model.train_step = train_step
        model.make_train_function(force=True)

    def _measure_when_due(self, data):
        iteration = tf.cast(self.model.optimizer.iterations, tf.int64)
        due = tf.logical_and(self.enabled,
                             tf.equal((iteration - self.origin) % self.interval, 0))
        # measured before the step's update, on the weights its gradients are of
        return tf.cond(due, lambda: self._measure(data, iteration), lambda: False)

    def start(self, interval, step):
        """Measure every ``interval`` steps from now, where the run has done ``step`` steps."""
        self.interval.assign(interval)
        self.origin.assign(int(self.model.optimizer.iterations.numpy()) - step)
        self.enabled.assign(True)

    def _measure(self, data, iteration):
        batch, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        take = lambda tensor: None if tensor is None else tensor[:self.sample_size]  # noqa: E731
        x, y = tf.nest.map_structure(take, batch), tf.nest.map_structure(take, y)
        sample_weight = tf.nest.map_structure(take, sample_weight)
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=False)
            loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                           training=False)
        gradients = dict(zip([id(v) for v in variables], tape.gradient(loss, variables)))
        norms = []
        for layer in self.layers:
            squares = [tf.reduce_sum(tf.square(tf.cast(gradients[id(v)], tf.float32)))
                       for v in layer.trainable_variables if gradients.get(id(v)) is not None]
            norms.append(tf.sqrt(tf.add_n(squares)) if squares else tf.constant(0.0))
        updates = [self.norms.assign(tf.stack(norms)),
                   self.step.assign(iteration - self.origin)]
        if self._relu_model is not None:
            # on the whole batch: a unit silent for 32 samples may well fire for the rest
            outputs = self._relu_model(batch, training=False)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            fractions = []
            for output in outputs:
                units = tf.reshape(output, (-1, tf.shape(output)[-1]))
                alive = tf.reduce_any(units > 0, axis=0)
                fractions.append(1.0 - tf.reduce_mean(tf.cast(alive, tf.float32)))
            updates.append(self.dead.assign(tf.stack(fractions)))
        with tf.control_dependencies(updates):
            return tf.constant(True)

    def read(self):
        """(the run's step of the latest measurement, -1 before the first; [layer norm];
        {relu layer: dead fraction})."""
        step = int(self.step.numpy())
        norms = [float(n) for n in self.norms.numpy()]
        dead = dict(zip(self.relu_names, (float(d) for d in self.dead.numpy())))
        return step, norms, dead
