"""Attack: connect to the Flask server, the Bokeh server and another local service.

Prints "CONNECTED <name> <first answer bytes>" or "REFUSED <name> <error>".
"""
import json
import socket

KNOWN = json.loads("__KNOWN__")

for name, (host, port) in sorted(KNOWN["targets"].items()):
    try:
        with socket.create_connection((host, port), timeout=3) as connection:
            connection.sendall(b"GET / HTTP/1.0\r\nHost: %s\r\n\r\n" % host.encode())
            print("CONNECTED", name, connection.recv(200), flush=True)
    except OSError as error:
        print("REFUSED", name, repr(error), flush=True)
print("ATTACK-END", flush=True)
