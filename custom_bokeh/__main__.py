"""``python -m custom_bokeh``: the Bokeh server with one dashboard per registered technique.

Sessions are signed: the server runs with ``sign_sessions=True`` and
``generate_session_ids=False``, so only pages that the Flask app gave a token
(``custom_bokeh.auth.embed_script``) open a session. The secret key comes from
the environment variable ``VISUALIZER_SECRET_KEY``, never from the command line
(other users could read it from the process list).
"""
import argparse
import os
import signal
import sys

from bokeh.server.server import Server

from custom_bokeh import compare
from custom_bokeh.dashboard import RunApplication, document_function
from custom_keras import registry, storage

SECRET_KEY_ENV = "VISUALIZER_SECRET_KEY"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m custom_bokeh", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=5006, help="port to listen on (default 5006)")
    parser.add_argument("--address", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--allow-websocket-origin", action="append", default=[],
                        metavar="HOST:PORT",
                        help="a page origin allowed to open sessions, e.g. 127.0.0.1:5000 "
                             "(repeatable; default: the server's own address)")
    parser.add_argument("--storage-dir", default=storage.storage_dir_from_env(),
                        help="the folder holding every user's runs (default: VISUALIZER_STORAGE "
                             "or <repo>/user_storage)")
    return parser.parse_args(argv)


def make_applications(storage_dir, secret_key):
    """{"/<key>": application} for every technique in the registry, and the comparison apps."""
    applications = {"/" + technique.key: RunApplication(document_function(technique), storage_dir,
                                                        secret_key, technique.key)
                    for technique in registry.TECHNIQUES}
    applications.update(compare.make_applications(storage_dir, secret_key))
    return applications


def main(argv=None):
    args = parse_args(argv)
    secret_key = os.environ.get(SECRET_KEY_ENV)
    if not secret_key:
        sys.exit("python -m custom_bokeh: set the environment variable %s to the installation's "
                 "secret key (the Flask app signs dashboard sessions with the same key)"
                 % SECRET_KEY_ENV)
    if not os.path.isdir(args.storage_dir):
        sys.exit("python -m custom_bokeh: --storage-dir %r is not a folder" % args.storage_dir)
    server = Server(make_applications(os.path.abspath(args.storage_dir), secret_key),
                    port=args.port, address=args.address,
                    allow_websocket_origin=args.allow_websocket_origin or None,
                    sign_sessions=True, secret_key=secret_key.encode("utf-8"),
                    generate_session_ids=False)
    server.start()

    for signal_number in (signal.SIGINT, signal.SIGTERM):
        server.io_loop.asyncio_loop.add_signal_handler(signal_number, server.io_loop.stop)
    print("Bokeh dashboards at http://%s:%d/ (%s)" % (
        args.address, server.port, ", ".join(t.key for t in registry.TECHNIQUES)), flush=True)
    server.io_loop.start()
    server.stop()


if __name__ == "__main__":
    main()
