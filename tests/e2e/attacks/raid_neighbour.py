"""Attack: read every file of alice's run folder, then overwrite each one.

Prints "READ <path> <first bytes>", "OVERWROTE <path>" or "DENIED <path> <error>".
"""
import json
import os

KNOWN = json.loads("__KNOWN__")

try:
    print("LISTED", os.listdir(KNOWN["storage_dir"]), flush=True)
except OSError as error:
    print("DENIED", KNOWN["storage_dir"], repr(error), flush=True)
paths = [os.path.join(KNOWN["alice_dir"], name) for name in KNOWN["alice_files"]]
for path in paths:
    try:
        with open(path, "rb") as f:
            print("READ", path, f.read(4096), flush=True)
    except OSError as error:
        print("DENIED", path, repr(error), flush=True)
for path in paths:
    try:
        with open(path, "r+b") as f:
            f.write(b"PWNED by mallory")
        print("OVERWROTE", path, flush=True)
    except OSError as error:
        print("DENIED", path, repr(error), flush=True)
print("ATTACK-END", flush=True)
