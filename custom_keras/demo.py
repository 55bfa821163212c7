"""The Explore page's demo: the reference network trained briefly on the digits, and a few digits.

``python -m custom_keras.demo <folder>`` (run by scripts/setup.sh) trains it when the folder
has no model yet and writes ``<folder>/model.keras`` and ``<folder>/images/``; the server's
``POST /explore/demo`` makes an exploration of them. Offline and seeded: the same model
every time, in a few seconds.
"""
import os
import shutil
import sys
import tempfile

from custom_keras import storage

EXAMPLE_IMAGES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "scripts", "examples", "images")
EPOCHS = 3
SEED = 0


def build(folder):
    """Trains the demo model into ``folder`` (made whole or not at all); nothing if it is there.

    Returns:
        whether it was trained now.
    """
    if os.path.isfile(os.path.join(folder, storage.EXPLORE_MODEL_FILE)):
        return False
    import keras

    from custom_keras.reference import build_reference_model, load_digits_28

    keras.utils.set_random_seed(SEED)
    x, y = load_digits_28(seed=SEED)
    model = build_reference_model()
    model.fit(x, y, epochs=EPOCHS, batch_size=32, verbose=0)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the server may run as another user
    try:
        model.save(os.path.join(staging, storage.EXPLORE_MODEL_FILE))
        os.makedirs(storage.images_dir(staging))
        for name in sorted(os.listdir(EXAMPLE_IMAGES_DIR)):
            if name.lower().endswith(".png"):
                shutil.copyfile(os.path.join(EXAMPLE_IMAGES_DIR, name),
                                os.path.join(storage.images_dir(staging), name))
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete one of an earlier set-up
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return True


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m custom_keras.demo <folder>")
    if build(sys.argv[1]):
        print("The Explore demo model was trained into %s." % sys.argv[1])
