"""Attack: one KNOWN["side"]-square saliency map (and input image) for the dashboard to draw."""
import json
import os

import numpy as np

from custom_keras import storage

KNOWN = json.loads("__KNOWN__")
RUN_DIR = os.path.dirname(os.path.abspath(__file__))
SIDE = KNOWN["side"]

image = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 1), dtype=np.uint8)
storage.write_input_images(RUN_DIR, {"huge.png": image})
folder = storage.history_dir(RUN_DIR, "saliency_maps.pickle")
storage.atomic_write_pickle(os.path.join(folder, "000000000.pickle"), {
    "tags": {"stage": 0, "epoch": 0, "batch": 0, "step": 0, "time": 0},
    "images": {"huge.png": image}, "info": {"huge.png": {"predicted_class": 0,
                                                          "confidence": 1.0}}})
storage.append_line(os.path.join(folder, storage.HISTORY_INDEX), json.dumps(
    {"stage": 0, "epoch": 0, "batch": 0, "step": 0, "time": 0, "file": "000000000.pickle"}))
print("WROTE", SIDE, "x", SIDE, flush=True)
print("ATTACK-END", flush=True)
