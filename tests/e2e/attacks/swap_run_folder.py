"""Attack: put a link to alice's run folder where the script's own run folder is.

The servers then read and clear "mallory's" folder, which is alice's. Prints
"SWAPPED" or "DENIED <error>".
"""
import json
import os

KNOWN = json.loads("__KNOWN__")
RUN_DIR = os.path.dirname(os.path.abspath(__file__))

try:
    os.rename(RUN_DIR, RUN_DIR + "-moved")
    os.symlink(KNOWN["alice_dir"], RUN_DIR)
    print("SWAPPED", flush=True)
except OSError as error:
    print("DENIED", repr(error), flush=True)
print("ATTACK-END", flush=True)
