"""The attribution methods against independent implementations: tf-keras-vis and Xplique.

Both get the model with its softmax replaced by the identity (a clone: tf-keras-vis'
ReplaceToLinear on its own copy, a logits twin for Xplique), since our scores are
pre-softmax. Xplique is installed without its dependencies (scripts/test.sh), since it
pins an older TensorFlow; what it imports is in requirements-test.txt.

Grad-CAM++ is checked against the paper's formula in test_attribution.py instead: both
libraries depart from it (tf-keras-vis divides the alphas by their sum over positions,
Xplique puts the mean of the feature map where the paper has its sum). SmoothGrad draws
its own noise in each library, so it has no reference to match value for value.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from custom_keras.techniques import attribution  # noqa: E402
from test_attribution import CLASSES, images, pre_softmax, small_cnn  # noqa: E402

LAST_CONV = 2  # small_cnn's "last_conv", at the input's resolution: nothing is resized


@pytest.fixture(scope="module")
def model_and_images():
    return small_cnn(), images()


@pytest.fixture(scope="module")
def logits_twin(model_and_images):
    model, _ = model_and_images
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    twin.layers[-1].activation = keras.activations.linear
    return twin


def predicted(model, batch):
    return np.argmax(pre_softmax(model, batch), axis=1)


def test_grad_cam_matches_tf_keras_vis(model_and_images):
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import CategoricalScore

    model, batch = model_and_images
    expected = Gradcam(model, model_modifier=ReplaceToLinear(), clone=True)(
        CategoricalScore(list(predicted(model, batch))), batch, penultimate_layer=LAST_CONV,
        normalize_cam=False, expand_cam=False)
    np.testing.assert_allclose(attribution.grad_cam(model, batch), expected, rtol=1e-4, atol=1e-7)


def test_score_cam_matches_tf_keras_vis(model_and_images):
    from tf_keras_vis.scorecam import Scorecam
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import CategoricalScore

    model, batch = model_and_images
    # max_N keeps the maps of largest spread over the whole batch, max_maps per image:
    # the same for one image.
    for batch, max_maps in ((batch, None), (batch[:1], 3)):
        expected = Scorecam(model, model_modifier=ReplaceToLinear(), clone=True)(
            CategoricalScore(list(predicted(model, batch))), batch, penultimate_layer=LAST_CONV,
            max_N=max_maps, normalize_cam=False, expand_cam=False)
        np.testing.assert_allclose(attribution.score_cam(model, batch, max_maps=max_maps), expected,
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["grad_cam", "guided_backprop", "integrated_gradients", "occlusion"])
def test_maps_match_xplique(name, model_and_images, logits_twin):
    import xplique.attributions as xplique

    model, batch = model_and_images
    targets = np.eye(CLASSES, dtype=np.float32)[predicted(model, batch)]
    explainer, ours = {
        "grad_cam": (lambda: xplique.GradCAM(logits_twin, conv_layer="last_conv"),
                     lambda: attribution.grad_cam(model, batch)),
        "guided_backprop": (lambda: xplique.GuidedBackprop(logits_twin, reducer=None),
                            lambda: attribution.guided_backprop(model, batch)),
        "integrated_gradients": (
            lambda: xplique.IntegratedGradients(logits_twin, steps=64, baseline_value=0.0, reducer=None),
            lambda: attribution.integrated_gradients(model, batch, steps=64)),
        "occlusion": (lambda: xplique.Occlusion(logits_twin, patch_size=3, patch_stride=2, occlusion_value=0.5),
                      lambda: attribution.occlusion(model, batch, patch=3, stride=2, value=0.5)),
    }[name]
    got = ours()
    expected = np.asarray(explainer().explain(batch, targets)).reshape(got.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
