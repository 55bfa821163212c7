"""Attack: named pipes and /dev/zero where the servers read results and output.

Named pipes (a read blocks until someone writes) as training_progress.tsv, a history
index, a history snapshot, output.txt, alerts.jsonl and dead_units.tsv; links to
/dev/zero (endless zeros) as a history index, a history snapshot, the input images,
the validation table and gradient_norms.tsv.
Prints "PLANTED <name>" or "DENIED".
"""
import json
import os

from custom_keras import registry, storage

KNOWN = json.loads("__KNOWN__")
RUN_DIR = os.path.dirname(os.path.abspath(__file__))
SNAPSHOT = "000000000.pickle"
ENTRY = json.dumps({"stage": 0, "epoch": 0, "batch": 0, "step": 0, "time": 0, "file": SNAPSHOT})


def index_path(key):
    return os.path.join(storage.history_dir(RUN_DIR, registry.get(key).results_file),
                        storage.HISTORY_INDEX)


def snapshot_path(key):
    return os.path.join(storage.history_dir(RUN_DIR, registry.get(key).results_file), SNAPSHOT)


def plant(make, path):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.lexists(path):
            os.rename(path, path + ".replaced")  # keeps the runner's open output file alive
        make(path)
        print("PLANTED", os.path.relpath(path, RUN_DIR), flush=True)
    except OSError as error:
        print("DENIED", os.path.relpath(path, RUN_DIR), repr(error), flush=True)


def zeros(path):
    os.symlink("/dev/zero", path)


def index(path):
    storage.append_line(path, ENTRY)


plant(os.mkfifo, storage.output_path(RUN_DIR))
plant(os.mkfifo, storage.results_path(RUN_DIR, "training_progress.tsv"))
plant(zeros, storage.results_path(RUN_DIR, "training_progress_val.tsv"))
plant(os.mkfifo, index_path("saliency_maps"))
plant(index, index_path("layer_activations"))
plant(zeros, snapshot_path("layer_activations"))
plant(zeros, storage.results_path(RUN_DIR, storage.INPUT_IMAGES_FILE))
plant(zeros, index_path("deconvolutional_network"))
plant(index, index_path("deep_visualization"))
plant(os.mkfifo, snapshot_path("deep_visualization"))
plant(os.mkfifo, storage.results_path(RUN_DIR, storage.ALERTS_FILE))
plant(zeros, storage.results_path(RUN_DIR, storage.GRADIENT_NORMS_TABLE))
plant(os.mkfifo, storage.results_path(RUN_DIR, storage.DEAD_UNITS_TABLE))
print("ATTACK-END", flush=True)
