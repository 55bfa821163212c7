"""Signed dashboard sessions: tokens, open_run, and the real Bokeh server refusing bad tokens."""
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request

import pytest
from bokeh.document import Document
from bokeh.util.token import generate_jwt_token, generate_session_id

from custom_bokeh import auth
from custom_bokeh.dashboard import RunApplication, open_run

SECRET = "test-secret-key-0123456789abcdefghijklmnopqrstuvwxyz"
APP = "saliency_maps"  # the technique the tokens below are minted for
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def storage_dir(tmp_path):
    for run in ("3/mnist_digits/runs/1", "4/other_script/runs/2"):
        os.makedirs(tmp_path / run)
    return str(tmp_path)


def signed_token(secret, payload, expiration=300, signed=True):
    """A token made directly with Bokeh's functions, to build tokens make_token refuses to make."""
    session_id = generate_session_id(secret_key=secret.encode(), signed=signed)
    return generate_jwt_token(session_id, secret_key=secret.encode(), signed=signed,
                              extra_payload=payload, expiration=expiration)


def tampered(token, **changes):
    """The token with its payload changed but the original signature kept."""
    body, signature = token.split(".", 1)
    padded = body + "=" * (-len(body) % 4)
    payload = json.loads(base64.urlsafe_b64decode(padded))
    payload.update(changes)
    new_body = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    return new_body + "." + signature


def bad_tokens():
    """Tokens the server must refuse, by name."""
    valid = auth.make_token(SECRET, 3, "3/mnist_digits/runs/1", APP)
    return {
        "unsigned": signed_token(SECRET, {"user_id": 3, "run": "3/mnist_digits/runs/1",
                                          "technique": APP}, signed=False),
        "forged": auth.make_token("another-installation's-key", 3, "3/mnist_digits/runs/1", APP),
        "expired": auth.make_token(SECRET, 3, "3/mnist_digits/runs/1", APP, expiration_s=-1),
        "tampered expiry": tampered(valid, session_expiry=2 ** 40),
        "tampered technique": tampered(valid, technique="training_progress"),
        "other technique": auth.make_token(SECRET, 3, "3/mnist_digits/runs/1", "training_progress"),
        "no technique": signed_token(SECRET, {"user_id": 3, "run": "3/mnist_digits/runs/1"}),
        "other user's run": signed_token(SECRET, {"user_id": 3, "run": "4/other_script/runs/2",
                                                  "technique": APP}),
        "outside storage": signed_token(SECRET, {"user_id": 3, "run": "3/..", "technique": APP}),
        "no run": signed_token(SECRET, {"user_id": 3, "technique": APP}),
        "garbage": "not-a-token",
    }


def test_a_valid_token_grants_exactly_its_run(storage_dir):
    token = auth.make_token(SECRET, 3, "3/mnist_digits/runs/1", APP)
    assert auth.verify_token(token, SECRET, storage_dir, APP) == os.path.realpath(
        os.path.join(storage_dir, "3", "mnist_digits", "runs", "1"))


@pytest.mark.parametrize("name", sorted(bad_tokens()))
def test_bad_tokens_are_refused(storage_dir, name):
    with pytest.raises(auth.InvalidToken):
        auth.verify_token(bad_tokens()[name], SECRET, storage_dir, APP)


def test_a_token_opens_only_the_technique_it_was_minted_for(storage_dir):
    token = auth.make_token(SECRET, 3, "3/mnist_digits/runs/1", APP)
    for other in ("training_progress", "layer_activations", "", None):
        with pytest.raises(auth.InvalidToken, match="another dashboard"):
            auth.verify_token(token, SECRET, storage_dir, other)


@pytest.mark.parametrize("linked", ["run folder", "runs folder", "script folder", "user folder"])
def test_a_token_for_one_run_cannot_open_another_users_run_folder_through_a_link(tmp_path,
                                                                                linked):
    os.makedirs(tmp_path / "4" / "mnist_digits" / "runs" / "1")  # another user's run
    own = tmp_path / "3" / "mnist_digits" / "runs"
    if linked == "run folder":
        os.makedirs(own)
        os.symlink("../../../4/mnist_digits/runs/1", own / "1")
    elif linked == "runs folder":
        os.makedirs(own.parent)
        os.symlink("../../4/mnist_digits/runs", own)
    elif linked == "script folder":
        os.makedirs(own.parent.parent)
        os.symlink("../4/mnist_digits", own.parent)
    else:
        os.symlink("4", tmp_path / "3")
    token = auth.make_token(SECRET, 3, "3/mnist_digits/runs/1", APP)
    with pytest.raises(auth.InvalidToken, match="outside the storage folder"):
        auth.verify_token(token, SECRET, str(tmp_path), APP)


@pytest.mark.parametrize("user_id, run_rel_dir", [
    (3, "4/other_script/runs/2"), (3, "3/../4/other_script/runs/2"), (3, "3"), (3, "3/a/b"),
    (3, "3/mnist_digits"), (3, "3/mnist_digits/runs/x"), (3, "3/mnist_digits/other/1"),
    (3, "3/mnist_digits/runs/1/results"), (3, "/etc/passwd"), (3, None)])
def test_make_token_refuses_runs_of_other_users(user_id, run_rel_dir):
    with pytest.raises(ValueError, match="run_rel_dir"):
        auth.make_token(SECRET, user_id, run_rel_dir, APP)


def test_make_token_needs_a_secret_key():
    with pytest.raises(ValueError, match="secret_key"):
        auth.make_token("", 3, "3/mnist_digits/runs/1", APP)


@pytest.mark.parametrize("technique_key", ["", None])
def test_make_token_needs_a_technique(technique_key):
    with pytest.raises(ValueError, match="technique_key"):
        auth.make_token(SECRET, 3, "3/mnist_digits/runs/1", technique_key)


def test_embed_script_carries_no_plain_user_or_file_name():
    script = auth.embed_script("http://127.0.0.1:5006/", SECRET, "saliency_maps", 3,
                               "3/mnist_digits/runs/1")
    assert "http://127.0.0.1:5006/saliency_maps/autoload.js" in script
    assert "Bokeh-Session-Id" in script
    assert "mnist_digits" not in script and "user_id" not in script


def session_document(token, application):
    """A document whose session context looks like the server's for this token."""
    doc = Document()
    context = types.SimpleNamespace(id=token, server_context=types.SimpleNamespace(
        application_context=types.SimpleNamespace(application=application)))
    doc._session_context = lambda: context
    return doc


def test_open_run_returns_the_run_of_a_valid_token(storage_dir):
    application = RunApplication(lambda doc: None, storage_dir, SECRET, APP)
    doc = session_document(auth.make_token(SECRET, 3, "3/mnist_digits/runs/1", APP), application)
    assert open_run(doc) == os.path.realpath(os.path.join(storage_dir, "3", "mnist_digits", "runs", "1"))
    assert doc.roots == []


@pytest.mark.parametrize("name", ["forged", "expired", "other user's run", "other technique"])
def test_open_run_shows_why_it_refuses(storage_dir, name):
    application = RunApplication(lambda doc: None, storage_dir, SECRET, APP)
    doc = session_document(bad_tokens()[name], application)
    assert open_run(doc) is None
    [message] = doc.roots
    assert message.text.startswith("Access refused: ")


def test_open_run_outside_the_server_refuses():
    doc = Document()
    assert open_run(doc) is None
    assert "only from a file page" in doc.roots[0].text


# --- the real server ----------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(storage_dir, secret=SECRET, extra_origins=()):
    """``python -m custom_bokeh`` on a free port; returns (process, base URL)."""
    port = free_port()
    origins = sum((["--allow-websocket-origin", o] for o in extra_origins), [])
    env = dict(os.environ, VISUALIZER_SECRET_KEY=secret)
    process = subprocess.Popen(
        [sys.executable, "-m", "custom_bokeh", "--port", str(port), "--address", "127.0.0.1",
         "--storage-dir", storage_dir] + origins,
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = "http://127.0.0.1:%d" % port
    deadline = time.time() + 60
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the Bokeh server exited: %s" % process.stdout.read())
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the Bokeh server did not start within 60 s")


def stop_server(process):
    process.terminate()
    try:
        return process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    storage_dir = str(tmp_path_factory.mktemp("storage"))
    for run in ("3/mnist_digits/runs/1", "4/other_script/runs/2"):
        os.makedirs(os.path.join(storage_dir, run))
    process, url = start_server(storage_dir)
    yield url
    assert stop_server(process) == 0  # SIGTERM shuts down cleanly


def autoload(url, app, token=None):
    """GET the app's autoload.js the way an embedded page does: (status, body)."""
    request = urllib.request.Request(
        "%s/%s/autoload.js?bokeh-autoload-element=x&bokeh-absolute-url=%s/%s" % (
            url, app, url, app),
        headers={"Bokeh-Session-Id": token} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


def test_server_opens_a_session_for_a_valid_token(server):
    status, body = autoload(server, APP, auth.make_token(SECRET, 3, "3/mnist_digits/runs/1", APP))
    assert status == 200
    assert "Bokeh" in body


def test_server_serves_every_registered_technique(server):
    from custom_keras import registry
    for technique in registry.TECHNIQUES:
        token = auth.make_token(SECRET, 3, "3/mnist_digits/runs/1", technique.key)
        assert autoload(server, technique.key, token)[0] == 200, technique.key


def test_server_refuses_a_token_minted_for_another_technique(server):
    from custom_keras import registry
    token = auth.make_token(SECRET, 3, "3/mnist_digits/runs/1", APP)
    for technique in registry.TECHNIQUES:
        if technique.key != APP:
            assert autoload(server, technique.key, token)[0] == 403, technique.key


def test_server_refuses_a_request_without_token(server):
    assert autoload(server, "saliency_maps")[0] == 403


@pytest.mark.parametrize("name", sorted(bad_tokens()))
def test_server_refuses_bad_tokens(server, name):
    assert autoload(server, APP, bad_tokens()[name])[0] == 403


def test_server_stops_cleanly_on_sigint(tmp_path):
    process, url = start_server(str(tmp_path))
    assert autoload(url, "saliency_maps")[0] == 403  # up and answering
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=15) == 0


def test_server_needs_the_secret_key_from_the_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VISUALIZER_SECRET_KEY"}
    result = subprocess.run([sys.executable, "-m", "custom_bokeh", "--storage-dir", str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "VISUALIZER_SECRET_KEY" in result.stderr
