"""Attack: leave a process behind that outlives Stop.

A child calls setsid() and forks again (a daemon: new session, new process group,
its parent gone); the grandchild ignores SIGTERM and SIGHUP and sleeps an hour
under the name KNOWN["marker"], so the test can find it from outside. The script
then waits to be stopped. Prints "ESCAPED" once the daemon exists.
"""
import json
import os
import shutil
import signal
import time

KNOWN = json.loads("__KNOWN__")
SLEEP = shutil.which("sleep") or "/bin/sleep"

child = os.fork()
if child == 0:
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ignored signals stay ignored across exec
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        os.execv(SLEEP, [KNOWN["marker"], "3600"])
    os._exit(0)
os.waitpid(child, 0)
print("ESCAPED", flush=True)
print("ATTACK-END", flush=True)
time.sleep(3600)
