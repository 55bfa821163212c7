"""Attack: write KNOWN["megabytes"] MB into the run folder as fast as possible.

Prints "WROTE <n> MB" every 100 MB and "WROTE ALL" at the end; an error is printed
as "STOPPED <error>".
"""
import json
import os

KNOWN = json.loads("__KNOWN__")
CHUNK = b"\0" * 2 ** 20

try:
    with open("filler.bin", "wb") as f:
        for megabyte in range(1, KNOWN["megabytes"] + 1):
            f.write(CHUNK)
            if megabyte % 100 == 0:
                f.flush()
                print("WROTE", megabyte, "MB", flush=True)
    print("WROTE ALL", flush=True)
except OSError as error:
    print("STOPPED", repr(error), flush=True)
print("ATTACK-END", flush=True)
