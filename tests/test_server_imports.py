"""The servers never import keras or tensorflow, and custom_keras never imports bokeh:
each side starts fast, and a technique's drawing stays out of the training process."""
import json
import subprocess
import sys

REPORT_MODULES = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(name for name in sys.modules
                        if name.split(".")[0] in ("keras", "tensorflow", "bokeh"))))
"""


def imported_packages(*modules):
    """The keras, tensorflow and bokeh modules loaded by importing ``modules`` in a fresh
    interpreter."""
    result = subprocess.run([sys.executable, "-c", REPORT_MODULES] + list(modules),
                            capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in json.loads(result.stdout.splitlines()[-1])}


def test_the_web_app_imports_neither_keras_nor_tensorflow():
    # create_app imports the runner and the sandbox when it builds the runner
    assert imported_packages("visualizer", "visualizer.__main__", "visualizer.runner",
                             "visualizer.sandbox") <= {"bokeh"}


def test_the_bokeh_server_and_every_dashboard_import_neither_keras_nor_tensorflow():
    from custom_keras import registry

    dashboards = ["custom_bokeh." + technique.key for technique in registry.TECHNIQUES]
    dashboards += ["custom_bokeh.attribution", "custom_bokeh.attribution_methods"]
    assert imported_packages("custom_bokeh.__main__", *dashboards) == {"bokeh"}


def test_the_callbacks_import_no_bokeh():
    assert "bokeh" not in imported_packages("custom_keras.callbacks")
