"""A technique is one declaration in custom_keras.registry: its register method, results file,
Bokeh app and README line come from it, and the Appendix C API stays as it was."""
import inspect
import os

import pytest

from custom_keras import registry
from custom_keras.callbacks import CustomCallbacks
from custom_keras.techniques.activations import EXCLUDE_LAYERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPENDIX_D_FILES = {"layer_activations": "layer_activations.pickle",
                    "saliency_maps": "saliency_maps.pickle",
                    "deconvolutional_network": "deconvolutional_network.pickle",
                    "deep_visualization": "deep_visualization.pickle"}


def call_signature(method):
    """E.g. "(interval=None)": the method's signature without self."""
    signature = inspect.signature(method)
    return str(signature.replace(parameters=list(signature.parameters.values())[1:]))


def test_the_appendix_c_methods_keep_their_names_arguments_and_defaults():
    # keep_epochs is a later, optional keyword: every Appendix C call still works as written
    assert {name: call_signature(getattr(CustomCallbacks, "register_" + name)).replace(
        str(EXCLUDE_LAYERS), "EXCLUDE_LAYERS") for name in (
        "network_saver", "training_progress", "layer_activations", "saliency_maps",
        "deconvolutional_network", "deep_visualization")} == {
        "network_saver": "(keep_epochs=False)",
        "training_progress": "(health_checks=True)",
        "layer_activations": "(exclude_layers=EXCLUDE_LAYERS, interval=None)",
        "saliency_maps": "(interval=None)",
        "deconvolutional_network": "(feat_map_layer_no, feat_map_amount=None, feat_map_nos=None, "
                                   "custom_keras_model_info=None, interval=None)",
        "deep_visualization": "(units_to_visualize, learning_rate, no_of_iterations, l2_decay=0, "
                              "blur_interval=0, blur_std=0, value_percentile=0, "
                              "norm_percentile=0, contribution_percentile=0, "
                              "abs_contribution_percentile=0, interval=None)"}


def test_the_attribution_register_calls_are_those_of_the_issue():
    assert {t.key: call_signature(getattr(CustomCallbacks, "register_" + t.key))
            for t in registry.ATTRIBUTION_TECHNIQUES} == {
        "grad_cam": "(layer_no=None, class_index=None, interval=None)",
        "grad_cam_plus_plus": "(layer_no=None, class_index=None, interval=None)",
        "score_cam": "(layer_no=None, class_index=None, max_maps=None, interval=None)",
        "guided_backprop": "(class_index=None, interval=None)",
        "smooth_grad": "(samples=50, noise=0.2, class_index=None, interval=None)",
        "integrated_gradients": "(steps=64, baseline='black', class_index=None, interval=None)",
        "occlusion": "(patch=8, stride=4, value=0, class_index=None, interval=None)",
        "lrp": "(rule='epsilon', epsilon=1e-06, alpha=1, beta=0, first_layer_rule=None, "
               "class_index=None, interval=None)"}


@pytest.mark.parametrize("technique", [t for t in registry.TECHNIQUES if t.function],
                         ids=lambda t: t.key)
def test_every_declared_function_gets_a_register_method_with_its_defaults_and_help(technique):
    method = getattr(CustomCallbacks, "register_" + technique.key)
    function = registry.load(technique.function)
    parameters = inspect.signature(method).parameters
    assert list(parameters) == ["self"] + list(technique.parameters) + ["interval"]
    for name in technique.parameters:
        assert parameters[name].default == inspect.signature(function).parameters[name].default
    assert technique.title in method.__doc__ and technique.results_file in method.__doc__


def test_every_technique_with_a_callback_has_its_register_method():
    for technique in registry.TECHNIQUES:
        if technique.callback:
            assert callable(getattr(CustomCallbacks, "register_" + technique.key, None)), \
                technique.key


@pytest.mark.parametrize("technique", registry.TECHNIQUES, ids=lambda t: t.key)
def test_every_declared_register_call_example_registers(tmp_path, technique):
    callbacks = CustomCallbacks(str(tmp_path))
    exec(technique.register_call, {"callbacks": callbacks})
    assert callbacks.get_list()


@pytest.mark.parametrize("technique", registry.TECHNIQUES, ids=lambda t: t.key)
def test_every_dotted_path_of_a_declaration_names_something_callable(technique):
    paths = [technique.function, technique.callback, technique.render, technique.make_document]
    paths += [path for _, path in technique.companions]
    for path in filter(None, paths):
        assert callable(registry.load(path)), path


def test_results_files_are_named_after_the_key_but_for_the_appendix_d_ones():
    for technique in registry.TECHNIQUES:
        if technique.key in APPENDIX_D_FILES:
            assert technique.results_file == APPENDIX_D_FILES[technique.key]
        elif technique.callback:
            assert technique.results_file == technique.key + ".pickle"
    files = [t.results_file for t in registry.TECHNIQUES if t.results_file]
    assert len(files) == len(set(files))


def test_every_explanation_says_what_it_shows_how_to_read_it_and_how_it_misleads():
    for technique in registry.TECHNIQUES:
        parts = technique.explanation
        for part in (parts.shows, parts.reading, parts.misleads):
            assert len(part) > 20 and part.endswith("."), (technique.key, part)
        assert technique.description == " ".join((parts.shows, parts.reading, parts.misleads))


def test_a_declaration_draws_either_with_render_or_with_a_page_of_its_own():
    with pytest.raises(ValueError, match="either render or make_document"):
        registry.Technique(key="x", title="X", explanation=registry.Explanation("a", "b", "c"),
                           register_call="callbacks.register_x()")


def test_the_comparison_tab_shows_only_when_an_attribution_method_is_registered():
    comparison = registry.get("attribution_methods")
    assert not comparison.shows_tab(None) and not comparison.shows_tab({"saliency_maps": {}})
    assert comparison.shows_tab({"lrp": {}})
    assert registry.get("saliency_maps").shows_tab(None)


def test_the_readme_lists_every_declared_register_call_with_its_arguments():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for technique in registry.TECHNIQUES:
        if technique.function:
            line = "| `register_%s%s` | `%s` |" % (
                technique.key, call_signature(getattr(CustomCallbacks, "register_" + technique.key)),
                technique.results_file)
            assert line in readme, line
