"""Attack: SIGKILL alice's running run, the Bokeh server and the Flask server.

Finds them by scanning /proc (every process of this installation, found by its
environment, and alice's run, found by its folder), adds the pids the attacker
learned otherwise, and kills them all, its own run excepted. Prints "KILLED <pid>"
or "DENIED <pid> <error>".
"""
import json
import os
import signal

KNOWN = json.loads("__KNOWN__")


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


own_run = os.path.dirname(os.path.abspath(__file__)).encode()
port = ("VISUALIZER_PORT=%d" % KNOWN["flask_port"]).encode()
found = []
for name in os.listdir("/proc"):
    if not name.isdigit() or int(name) == os.getpid():
        continue
    environ = read("/proc/%s/environ" % name).split(b"\0")
    command = read("/proc/%s/cmdline" % name)
    if any(entry.startswith(b"VISUALIZER_RUN_DIR=") and entry.endswith(own_run)
           for entry in environ) or own_run in command:
        continue
    if port in environ or KNOWN["alice_dir"].encode() in command:
        found.append(int(name))
print("FOUND", sorted(found), flush=True)
# Alice's run first, the Flask server (which reports this run) last.
targets = list(dict.fromkeys(KNOWN["alice_pids"] + sorted(found) + KNOWN["bokeh_pids"]
                             + [KNOWN["flask_pid"]]))
targets.sort(key=lambda pid: pid == KNOWN["flask_pid"])
for pid in targets:
    try:
        os.kill(pid, signal.SIGKILL)
        print("KILLED", pid, flush=True)
    except OSError as error:
        print("DENIED", pid, repr(error), flush=True)
print("ATTACK-END", flush=True)
