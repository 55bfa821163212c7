"""Attack: write KNOWN["megabytes"] MB into the run folder as fast as possible, in files
of 64 MB (so that a limit on the size of one file does not stop it).

Prints "WROTE <n> MB" every 100 MB and "WROTE ALL" at the end; errors are printed as
"REFUSED <error>", and three in a row end the attack.
"""
import json

KNOWN = json.loads("__KNOWN__")
CHUNK = b"\0" * 2 ** 20
FILE_MB = 64

written, errors, number = 0, 0, 0
while written < KNOWN["megabytes"] and errors < 3:
    try:
        with open("filler-%d.bin" % number, "wb") as f:
            for _ in range(FILE_MB):
                f.write(CHUNK)
                written += 1
                if written % 100 == 0:
                    print("WROTE", written, "MB", flush=True)
        errors = 0
    except OSError as error:
        errors += 1
        print("REFUSED", repr(error), flush=True)
    number += 1
if written >= KNOWN["megabytes"]:
    print("WROTE ALL", flush=True)
print("ATTACK-END", flush=True)
