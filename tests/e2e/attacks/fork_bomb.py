"""Attack: a fork bomb, bounded here to KNOWN["attempts"] processes so that a machine
without defences survives the test.

Each child becomes a sleeping process named KNOWN["marker"] (the test counts them from
outside). Prints "FORK REFUSED after <n> processes: <error>" when the system stops it,
else "FORKED <n>".
"""
import json
import os
import shutil
import time

KNOWN = json.loads("__KNOWN__")
SLEEP = shutil.which("sleep") or "/bin/sleep"

started = 0
try:
    while started < KNOWN["attempts"]:
        if os.fork() == 0:
            try:
                os.execv(SLEEP, [KNOWN["marker"], "120"])
            finally:
                os._exit(0)
        started += 1
    print("FORKED", started, flush=True)
except OSError as error:
    print("FORK REFUSED after %d processes: %r" % (started, error), flush=True)
print("ATTACK-END", flush=True)
time.sleep(5)  # the children are still there while the test looks
