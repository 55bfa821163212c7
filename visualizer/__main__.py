"""``python -m visualizer``: the one start command (``scripts/start.sh`` calls it).

Creates the app (and with it the database tables, on first start), starts the
Bokeh server (``python -m custom_bokeh``) as a child process, and serves the
Flask app with waitress. Ctrl-C or SIGTERM stops both servers and every running
run, so no process is left behind. Settings come from the environment
variables listed in ``visualizer/config.py``.
"""
import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import waitress

from visualizer import config, create_app
from visualizer.explore import largest_request_bytes
from visualizer.runner import RunnerUnavailable

WAITRESS_THREADS = 8
# Room for a multipart form's fields and boundaries around the largest upload: a body
# over its endpoint's limit gets Flask's 413 page, one over the largest limit and this
# margin too is refused by waitress from its Content-Length (or as it streams in)
# before being read.
REQUEST_BODY_MARGIN = 1024 * 1024
BOKEH_START_TIMEOUT_S = 60
BOKEH_STOP_TIMEOUT_S = 10
PR_SET_PDEATHSIG = 1


class StartError(Exception):
    """The servers cannot start; the message says why and what to change."""


def main():
    """Starts both servers, serves until Ctrl-C or SIGTERM, then stops everything it started."""
    try:
        settings = config.complete_settings(config.settings_from_env())
        check_port_free(settings["HOST"], settings["PORT"], "VISUALIZER_PORT")
        check_port_free(settings["HOST"], settings["BOKEH_PORT"], "VISUALIZER_BOKEH_PORT")
    except (ValueError, OSError, StartError) as error:  # a bad setting, folder or port
        sys.exit("python -m visualizer: %s" % error)
    # Also SIGINT: a shell starts background jobs with it ignored, yet `kill -INT` should stop us.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    # Started before create_app starts the runner's thread: see start_bokeh.
    bokeh = start_bokeh(settings)
    runner = None
    try:
        app = create_app()
        runner = app.extensions["runner"]
        server = _create_server(app)
        wait_for_bokeh(bokeh, settings)
        print("Training visualizer: open http://%s:%d/ in a browser (dashboards served from %s). "
              "Ctrl-C stops it." % (_client_host(app.config["HOST"]), app.config["PORT"],
                                    app.config["BOKEH_URL"]), flush=True)
        server.run()  # returns on Ctrl-C or SIGTERM
        server.close()
    except (StartError, RunnerUnavailable) as error:
        print("python -m visualizer: %s" % error, file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass  # interrupted while starting
    finally:
        # Runs are in their own process groups: without this they would be orphaned.
        if runner is not None:
            runner.shutdown(stop_runs=True)
        stop_process(bokeh)
    print("Training visualizer stopped.", flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def check_port_free(host, port, variable):
    """Raises StartError, naming the setting to change, if ``host:port`` is taken."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            probe.bind((host, port))
        except OSError as error:
            raise StartError(_port_message(host, port, variable, error)) from None


def _port_message(host, port, variable, error):
    if error.errno == errno.EADDRINUSE:
        return ("port %d on %s is already in use (is the visualizer already running?); "
                "stop that program or choose another port with %s" % (port, host, variable))
    return "cannot listen on %s:%d (%s); check VISUALIZER_HOST and %s" % (
        host, port, error.strerror, variable)


def _create_server(app):
    host, port = app.config["HOST"], app.config["PORT"]
    try:
        return waitress.create_server(
            app, host=host, port=port, threads=WAITRESS_THREADS,
            max_request_body_size=largest_request_bytes(app) + REQUEST_BODY_MARGIN)
    except OSError as error:
        raise StartError(_port_message(host, port, "VISUALIZER_PORT", error)) from None


def websocket_origins(settings):
    """The page origins (host:port of the Flask app) allowed to open Bokeh sessions."""
    port = settings["PORT"]
    hosts = [settings["HOST"], "localhost", "127.0.0.1", urlsplit(settings["BOKEH_URL"]).hostname]
    origins = []
    for host in hosts:
        origin = "%s:%d" % (host, port)
        if host and origin not in origins:
            origins.append(origin)
    return origins


def start_bokeh(settings):
    """Starts ``python -m custom_bokeh``; it gets SIGTERM if this process dies.

    Call it while this process has a single thread: the parent-death signal is
    set between fork and exec, which is safe only then.
    """
    command = [sys.executable, "-m", "custom_bokeh", "--port", str(settings["BOKEH_PORT"]),
               "--address", settings["HOST"], "--storage-dir", settings["STORAGE_DIR"]]
    for origin in websocket_origins(settings):
        command += ["--allow-websocket-origin", origin]
    # The secret key goes by environment: other users can read a process's argv.
    env = dict(os.environ, VISUALIZER_SECRET_KEY=settings["SECRET_KEY"])
    return subprocess.Popen(command, env=env, cwd=config.REPO_ROOT,  # -m finds it in cwd
                            preexec_fn=_terminate_with_parent)


def _terminate_with_parent():
    """Linux prctl(PR_SET_PDEATHSIG, SIGTERM): no Bokeh server outlives a killed visualizer."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_for_bokeh(bokeh, settings):
    """Waits until the Bokeh server accepts connections.

    Raises:
        StartError: it exited or did not answer within BOKEH_START_TIMEOUT_S.
    """
    address = (_client_host(settings["HOST"]), settings["BOKEH_PORT"])
    deadline = time.time() + BOKEH_START_TIMEOUT_S
    while time.time() < deadline:
        if bokeh.poll() is not None:
            raise StartError("the Bokeh server exited with code %d while starting (see its "
                             "message above)" % bokeh.returncode)
        try:
            socket.create_connection(address, timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise StartError("the Bokeh server did not answer on %s:%d within %d s"
                     % (address + (BOKEH_START_TIMEOUT_S,)))


def stop_process(process):
    """SIGTERM, then SIGKILL if it has not ended after BOKEH_STOP_TIMEOUT_S."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(BOKEH_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _client_host(host):
    """An address a browser or client on this machine can use for ``host``."""
    return {"0.0.0.0": "127.0.0.1", "::": "localhost", "": "127.0.0.1"}.get(host, host)


def _family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


if __name__ == "__main__":
    main()
