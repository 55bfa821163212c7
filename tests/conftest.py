"""Shared fixtures for the web app tests (after Flask's tutorial app, flaskr).

``app`` is a fresh app with its own database and storage folder under
``tmp_path`` and a ``FakeRunner`` that records calls instead of spawning
processes; ``client`` is its test client; ``auth`` creates users and logs in.
CSRF checks are off here; tests/test_security.py turns them on.
"""
import builtins
import errno
import io
import os
from types import SimpleNamespace

import pytest

from visualizer import create_app
from visualizer.run_store import run_folder, script_dir


class FakeRunner:
    """Records start/stop/reconcile calls; a test feeds state changes with ``apply_run_update``."""

    def __init__(self, reconcile_updates=()):
        self.started = []
        self.disk_limits_mb = {}  # run id: the disk_limit_mb it was started with
        self.stopped = []
        self.reconciled = []
        self.reconcile_updates = list(reconcile_updates)

    def start(self, run_id, run_dir, script_file, disk_limit_mb=None):
        self.started.append((run_id, run_dir, script_file))
        self.disk_limits_mb[run_id] = disk_limit_mb

    def stop(self, run_id):
        self.stopped.append(run_id)

    def reconcile(self, records):
        self.reconciled.append(list(records))
        return self.reconcile_updates


def run_update(run_id, state, exit_code=None, pid=None, started_at=None, ended_at=None,
               message=None):
    """A stand-in for ``visualizer.runner.RunUpdate`` with the same fields."""
    return SimpleNamespace(run_id=run_id, state=state, exit_code=exit_code, pid=pid,
                           started_at=started_at, ended_at=ended_at, message=message)


def make_test_config(tmp_path, **overrides):
    config = {
        "TESTING": True,
        "SECRET_KEY": "test-secret-key",
        "WTF_CSRF_ENABLED": False,
        "INSTANCE_DIR": str(tmp_path / "instance"),
        "STORAGE_DIR": str(tmp_path / "storage"),
        "SQLALCHEMY_DATABASE_URI": "sqlite:///" + str(tmp_path / "test.sqlite"),
        "BOKEH_URL": "http://bokeh.test:5006",
        "RUNNER": FakeRunner(),
    }
    config.update(overrides)
    return config


@pytest.fixture
def app(tmp_path):
    return create_app(make_test_config(tmp_path))


@pytest.fixture
def client(app):
    return app.test_client()


class AuthActions:
    def __init__(self, client):
        self._client = client

    def register(self, username="alice_1", password="password123", confirm=None):
        """Creates a user (which logs them in), then logs out: tests log in as they need."""
        response = self._client.post("/auth/register", data={
            "username": username, "password": password,
            "confirm": password if confirm is None else confirm})
        if response.status_code == 302:
            self.logout()
        return response

    def login(self, username="alice_1", password="password123", next_url=None,
              address="127.0.0.1"):
        data = {"username": username, "password": password}
        if next_url is not None:
            data["next"] = next_url
        return self._client.post("/auth/login", data=data,
                                 environ_base={"REMOTE_ADDR": address})

    def register_and_login(self, username="alice_1", password="password123"):
        self.register(username, password)
        return self.login(username, password)

    def logout(self):
        return self._client.post("/auth/logout")


@pytest.fixture
def auth(client):
    return AuthActions(client)


SCRIPT_SOURCE = "print('hello')\n"


def upload_script(client, name="mnist_keras.py", source=SCRIPT_SOURCE, tags="", **kwargs):
    """POST a script upload; ``source`` may be str or bytes."""
    data = source.encode("utf-8") if isinstance(source, str) else source
    return client.post("/upload", data={"file": (io.BytesIO(data), name), "tags": tags},
                       content_type="multipart/form-data", **kwargs)


def png_bytes(size=(8, 8), color=128):
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("L", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def script_folder(app, script_id):
    """The script's own folder: its upload, and its runs' folders below ``runs/``."""
    from visualizer.models import Script, db
    with app.app_context():
        return script_dir(app, db.session.get(Script, script_id))


def newest_run_folder(app, script_id):
    """The folder of the script's newest run; a finished run (its row and a folder with the
    script's copy) is made first when the script has none. Tests write results into it."""
    from visualizer.models import Run, Script, db
    with app.app_context():
        script = db.session.get(Script, script_id)
        run = script.last_run
        if run is None:
            run = Run(script=script, state="finished", exit_code=0, number=1)
            db.session.add(run)
            db.session.commit()
            os.makedirs(run_folder(app, run))
            with open(os.path.join(script_dir(app, script), script.filename), "rb") as f:
                source = f.read()
            with open(os.path.join(run_folder(app, run), script.filename), "wb") as f:
                f.write(source)
        return run_folder(app, run)


class DiskFullWhileWriting:
    """``open`` for a file whose writes put a few bytes on disk, then fail: the disk is full."""

    def __init__(self, path, *args, **kwargs):
        self._file = builtins.open(path, *args, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()

    def __getattr__(self, name):  # reading works as ever
        return getattr(self._file, name)

    def write(self, data):
        self._file.write(data[:3])
        self._file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="session")
def ray_head():
    """A local Ray head with token authentication, for the tests marked ``ray``; stopped at the
    end of the session, nothing of it left running."""
    from ray_head import RayHead
    head = RayHead().start()
    yield head
    head.stop()
