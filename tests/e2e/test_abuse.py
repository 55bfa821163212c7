"""Abuse against the real servers: another user, forged tokens, bad requests, hostile scripts.

The owner has a finished run (script, image, output, results, network). The
intruder, another logged-in user, tries every URL of it, and every Bokeh token
it could forge or replay; then come requests without CSRF tokens, oversized
and malformed uploads, ``../`` names, and results pickles crafted to run code.
Everything must be refused, nothing written, nothing executed.

Then the attacks of issue 10 from inside, on servers of their own: mallory's
uploaded scripts (tests/e2e/attacks/) go for alice's account, files and runs, the
servers, the network and the machine, and plant links, pipes and huge results in
their own run folders; each is checked from outside. Last come the attacks on
accounts and requests: password guessing, name enumeration by timing, a cookie
replayed after logout, a 200 MB body, another user's tag id.
"""
import asyncio
import collections
import contextlib
import hashlib
import http.client as http_client
import http.cookies as http_cookies
import json
import os
import pickle
import re
import select
import shutil
import socket
import sqlite3
import stat
import statistics
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from bokeh.util.token import generate_jwt_token, generate_session_id, get_token_payload
from playwright.sync_api import Error as PlaywrightError
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from custom_keras import registry, storage
from e2e.harness import (BOKEH_STATE_JS, CSRF_PATTERN, ENDED_STATES, Servers, WebUser,
                         bokeh_state, fake_training, files_under, png_bytes, process_alive,
                         record_measurement, screenshot, wait_for)
from visualizer import config

SESSION_ID_PATTERN = re.compile(r'setRequestHeader\("Bokeh-Session-Id", "([^"]+)"\)')
# The websocket token the Bokeh server mints in autoload.js (it wraps the session id).
WEBSOCKET_TOKEN_PATTERN = re.compile(r'"token":"([^"]+)"')
TAG_REMOVE_PATTERN = re.compile(r'/scripts/\d+/tags/(\d+)/remove')
OWNER_STEM = "secret_model"
SECRET_LINE = "# owner's secret line 7f3a"


@pytest.fixture(scope="module")
def owner(playwright, servers):
    """A user with a finished run of ``secret_model.py``: image, output, results, network."""
    user = WebUser(playwright, servers, "owner_user").register_and_login()
    source = fake_training(OWNER_STEM, snapshots=3) + SECRET_LINE + "\n"
    user.script_id = user.upload_script(OWNER_STEM + ".py", source, tags="private")
    user.run(user.script_id, image=("digit.png", png_bytes()))
    assert user.wait_for_state(user.script_id, ("finished", "failed"), 60)["state"] == "finished"
    user.folder = user.run_dir(user.script_id, OWNER_STEM)
    user.user_id = int(user.script_dir(OWNER_STEM).parent.name)
    yield user
    user.request.dispose()


@pytest.fixture(scope="module")
def intruder(playwright, servers):
    user = WebUser(playwright, servers, "intruder_user").register_and_login()
    user.script_id = user.upload_script("mine.py", "print('mine')\n")
    user.folder = user.run_dir(user.script_id, "mine")
    user.user_id = int(user.script_dir("mine").parent.name)
    yield user
    user.request.dispose()


def owner_urls(owner):
    """Every GET URL of the owner's script (pages, JSON, downloads, images, dashboards)."""
    base = "/scripts/%d" % owner.script_id
    return [base, base + "/output", base + "/output.json", base + "/status.json",
            base + "/output/download", base + "/images/digit.png", base + "/network"] + [
        base + "/techniques/" + t.key for t in registry.TECHNIQUES]


def session_token(user, script_id, technique_key="saliency_maps"):
    """The signed Bokeh session id that the user's technique page embeds."""
    page = user.get("/scripts/%d/techniques/%s" % (script_id, technique_key))
    assert page.status == 200
    return SESSION_ID_PATTERN.search(page.text()).group(1)


def autoload(user, servers, token, technique_key="saliency_maps"):
    """Asks the Bokeh server for a session with ``token`` the way the embed script does."""
    app_url = "%s/%s" % (servers.bokeh_url, technique_key)
    query = urllib.parse.urlencode({"bokeh-autoload-element": "e2e", "bokeh-app-path":
                                    "/" + technique_key, "bokeh-absolute-url": app_url})
    headers = {"Bokeh-Session-Id": token} if token is not None else {}
    return user.request.get(app_url + "/autoload.js?" + query, headers=headers,
                            timeout=HTTP_TIMEOUT_MS)


def websocket_document(servers, token, technique_key="saliency_maps"):
    """Opens the dashboard's websocket with ``token`` as the browser does and pulls the
    session's document (Bokeh protocol: ACK, then PULL-DOC-REQ / PULL-DOC-REPLY).

    Returns:
        the document reply's JSON text, or None when the server refuses or closes.
    """
    async def pull():
        request = HTTPRequest("ws://127.0.0.1:%d/%s/ws" % (servers.bokeh_port, technique_key),
                              headers={"Origin": servers.url})
        try:
            connection = await websocket_connect(request, subprotocols=["bokeh", token])
        except HTTPClientError:
            return None
        try:
            frames = []
            while len(frames) < 3:  # the ACK: header, metadata, content
                frame = await asyncio.wait_for(connection.read_message(), 10)
                if frame is None:
                    return None
                frames.append(frame)
            for frame in ('{"msgid": "e2e", "msgtype": "PULL-DOC-REQ"}', "{}", "{}"):
                await connection.write_message(frame)
            reply = [await asyncio.wait_for(connection.read_message(), 10) for _ in range(3)]
            return None if None in reply else reply[2]
        finally:
            connection.close()

    # its own thread and event loop, apart from Playwright's
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, pull()).result(timeout=30)


def wrap_as_session_id(secret_key, session_id):
    """A websocket token for ``session_id``, as the Bokeh server mints in autoload.js."""
    return generate_jwt_token(session_id, secret_key=secret_key.encode("utf-8"), signed=True)


def jwt_token(secret_key, payload, expiration=300):
    """A Bokeh session token signed with ``secret_key`` carrying ``payload``."""
    key = secret_key.encode("utf-8")
    return generate_jwt_token(generate_session_id(secret_key=key, signed=True), secret_key=key,
                              signed=True, extra_payload=payload, expiration=expiration)


def test_other_users_pages_files_and_actions_are_404(owner, intruder):
    before = files_under(owner.folder)
    overview = owner.get("/scripts/%d" % owner.script_id).text()
    tag_id = TAG_REMOVE_PATTERN.search(overview).group(1)
    for url in owner_urls(owner):
        response = intruder.get(url)
        assert response.status == 404, url
        assert SECRET_LINE not in response.text() and "network of" not in response.text(), url
    token = intruder.csrf_token()
    base = "/scripts/%d" % owner.script_id
    for url in (base + "/run", base + "/stop", base + "/delete", base + "/tags",
                "%s/tags/%s/remove" % (base, tag_id)):
        response = intruder.post(url, form={"csrf_token": token, "tags": "stolen",
                                            "images": "keep"})
        assert response.status == 404, url
    listing = intruder.get("/?q=secret").text() + intruder.get("/?q=private").text()
    assert OWNER_STEM not in listing
    # The owner's work is untouched and still theirs.
    assert files_under(owner.folder) == before
    assert owner.status(owner.script_id)["state"] == "finished"
    overview_after = owner.get("/scripts/%d" % owner.script_id).text()
    assert "private" in overview_after and "stolen" not in overview_after


def test_logged_out_visitors_are_sent_to_login(owner, servers, playwright):
    anonymous = playwright.request.new_context(base_url=servers.url)
    try:
        for url in owner_urls(owner):
            response = anonymous.get(url, max_redirects=0)
            assert response.status == 302, url
            assert response.headers["location"].startswith("/auth/login"), url
    finally:
        anonymous.dispose()


def test_owner_token_opens_the_dashboard_and_forged_tokens_are_refused(owner, intruder,
                                                                        servers):
    owner_token = session_token(owner, owner.script_id)
    assert autoload(owner, servers, owner_token).status == 200
    key = servers.secret_key()
    owner_run = str(owner.folder.relative_to(servers.storage_dir))
    intruder_run = str(intruder.folder.relative_to(servers.storage_dir))
    # The intruder's own page signs a token for the intruder's run only.
    intruder_token = session_token(intruder, intruder.script_id)
    assert get_token_payload(intruder_token)["run"] == intruder_run
    forged = {
        "no token": None,
        "not a token": "not-a-token",
        "signed with another key": jwt_token("another-installation-key",
                                             {"user_id": owner.user_id, "run": owner_run}),
        # the intruder's token with the owner's run written into its payload
        "edited payload": jwt_token("another-installation-key", {
            "user_id": intruder.user_id, "run": owner_run}).split(".")[0]
            + "." + intruder_token.split(".")[1],
        # even a correctly signed token must name a run of its own user
        "another user's run": jwt_token(key, {"user_id": intruder.user_id, "run": owner_run}),
        "outside the storage folder": jwt_token(key, {"user_id": intruder.user_id,
                                                      "run": "%d/.." % intruder.user_id}),
        "path in the run name": jwt_token(key, {"user_id": owner.user_id,
                                                "run": owner_run + "/../../x"}),
        "expired": jwt_token(key, {"user_id": owner.user_id, "run": owner_run}, expiration=-10),
        "no payload": jwt_token(key, {}),
    }
    for name, token in forged.items():
        for user in (owner, intruder):
            assert autoload(user, servers, token).status == 403, name
        # The websocket, opened directly with the token, or with the token wrapped the
        # way the Bokeh server wraps a session id it accepted (possible only with the
        # installation key), is checked again where the document is made.
        if token:
            for websocket_token in (token, wrap_as_session_id(key, token)):
                document = websocket_document(servers, websocket_token)
                assert document is None or (
                    "Access refused" in document and "Predicted class" not in document), name
    minted = WEBSOCKET_TOKEN_PATTERN.search(autoload(owner, servers, owner_token).text()).group(1)
    assert "Predicted class 1" in websocket_document(servers, minted)
    # A token is a bearer credential bound to one run, not to a browser session: it
    # works for whoever holds it until it expires (5 minutes), and only the owner's
    # pages ever receive one (the intruder's requests for them get 404 above).
    assert autoload(intruder, servers, owner_token).status == 200
    # The plain app URL (a session id as a query argument) is refused too.
    for token in (None, forged["another user's run"], forged["edited payload"]):
        url = "%s/saliency_maps" % servers.bokeh_url
        if token:
            url += "?bokeh-session-id=" + urllib.parse.quote(token)
        assert intruder.request.get(url).status == 403, token


def test_posts_without_csrf_token_change_nothing(owner, servers):
    before = files_under(servers.storage_dir)
    base = "/scripts/%d" % owner.script_id
    refused = [
        owner.post("/upload", multipart={"file": {"name": "no_csrf.py", "mimeType": "text/x-python",
                                                  "buffer": b"print(1)\n"}}),
        owner.post(base + "/run", multipart={"images": "keep"}),
        owner.post(base + "/delete"),
        owner.post(base + "/tags", form={"tags": "csrf_less"}),
        owner.post(base + "/run", form={"images": "keep", "csrf_token": "forged-token"}),
        owner.post("/auth/logout"),
    ]
    for response in refused:
        assert response.status == 400, response.url
        assert "security token" in response.text()
    assert files_under(servers.storage_dir) == before
    assert owner.status(owner.script_id)["state"] == "finished"
    overview = owner.get(base)
    assert overview.status == 200 and "csrf_less" not in overview.text()


def test_oversized_upload_is_refused_and_writes_nothing(intruder, servers):
    before = files_under(servers.storage_dir)
    source = "# padding\n" * (300 * 1024)  # 3 MB, over the 2 MB limit of the session's servers
    response = intruder.upload("too_big.py", source)
    assert response.status == 413
    assert "larger than the limit of 2 MB" in response.text()
    assert files_under(servers.storage_dir) == before
    assert "too_big.py" not in intruder.get("/").text()


@pytest.mark.parametrize("filename, data, message", [
    ("notes.txt", b"print(1)\n", "is not a Python script"),
    (".py", b"print(1)\n", "is not a Python script"),
    ("latin1.py", "print('caf\u00e9')\n".encode("latin-1"), "is not a UTF-8 text file"),
    ("binary.py", b"print(1)\x00\x01\x02", "NUL bytes"),
])
def test_malformed_script_uploads_are_refused(intruder, servers, filename, data, message):
    before = files_under(servers.storage_dir)
    response = intruder.upload(filename, data)
    assert response.status == 400
    assert message in response.text()
    assert files_under(servers.storage_dir) == before


def test_broken_multipart_bodies_are_refused(intruder, servers):
    before = files_under(servers.storage_dir)
    token = intruder.csrf_token()
    missing_file = intruder.post("/upload", multipart={"csrf_token": token, "tags": "x"})
    assert missing_file.status == 400 and "Choose a .py file" in missing_file.text()
    truncated = intruder.post("/upload", headers={
        "Content-Type": "multipart/form-data; boundary=e2eboundary"},
        data=b'--e2eboundary\r\nContent-Disposition: form-data; name="file"; filename="x.py"'
             b'\r\n\r\nprint(1)\r\n--e2ebou')
    assert truncated.status == 400
    assert files_under(servers.storage_dir) == before


def test_dot_dot_names_stay_inside_the_users_folder(intruder, servers):
    before = files_under(servers.storage_dir.parent)
    script_id = intruder.upload_script("../../../../escape_e2e.py", "print('escape')\n")
    page = intruder.get("/scripts/%d" % script_id).text()
    assert "escape_e2e.py" in page
    created = files_under(servers.storage_dir.parent) - before
    # werkzeug's secure_filename turns the name into a plain one inside the user's folder
    assert created == {"storage/%d/escape_e2e/escape_e2e.py" % intruder.user_id}, created
    response = intruder.post("/scripts/%d/run" % script_id, multipart={
        "csrf_token": intruder.csrf_token(), "images": "new",
        "image": {"name": "../../../escape.png", "mimeType": "image/png", "buffer": png_bytes()}})
    assert response.status == 302
    intruder.wait_for_state(script_id, ("finished", "failed"), 60)
    images = intruder.run_dir(script_id, "escape_e2e") / "images"
    assert sorted(os.listdir(images)) == ["escape.png"]
    assert not (servers.storage_dir.parent / "escape.png").exists()
    for name in ("..%2Fescape_e2e.py", "..%2F..%2F..%2Finstance%2Fsecret_key", "%2Fetc%2Fpasswd",
                 "..", "escape_e2e.py"):
        assert intruder.get("/scripts/%d/images/%s" % (script_id, name)).status == 404, name


def test_bad_images_are_refused_before_a_run(intruder, servers):
    bomb = png_bytes(size=(12000, 12000), mode="1", color=0)  # 144 M pixels, a few kB
    cases = [("fake.png", b"this is not a picture", "is not a readable image"),
             ("bomb.png", bomb, "has too many pixels"),
             ("digit.exe", png_bytes(), "is not an image file name")]
    for name, data, message in cases:
        before = files_under(servers.storage_dir)
        status_before = intruder.status(intruder.script_id)
        response = intruder.post("/scripts/%d/run" % intruder.script_id, multipart={
            "csrf_token": intruder.csrf_token(), "images": "new",
            "image": {"name": name, "mimeType": "image/png", "buffer": data}})
        assert response.status == 302
        page = intruder.get(response.headers["location"]).text()
        assert message in page, name
        assert files_under(servers.storage_dir) == before, name
        assert intruder.status(intruder.script_id) == status_before, name


class Exploit:
    """Unpickling this runs ``os.system`` -- what a restricted unpickler must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, ("touch %s" % self.marker,))


class ExecExploit(Exploit):
    def __reduce__(self):
        return (exec, ("open(%r, 'w').close()" % str(self.marker),))


@pytest.mark.slow
def test_crafted_results_pickles_are_refused_and_never_run(owner, servers, browser, tmp_path):
    """Every pickle a dashboard reads is replaced by one that would create a marker file."""
    marker = tmp_path / "pickle_code_ran"
    script_id = owner.upload_script("crafted.py", "print('crafted')\n")
    folder = owner.run_dir(script_id, "crafted")
    for number, technique in enumerate(registry.SNAPSHOT_TECHNIQUES):
        exploit = (Exploit if number % 2 else ExecExploit)(marker)
        storage.atomic_write_pickle(storage.results_path(folder, technique.results_file), exploit)
        history = storage.history_dir(str(folder), technique.results_file)
        storage.atomic_write_pickle(os.path.join(history, "000000000.pickle"), exploit)
        storage.append_line(os.path.join(history, storage.HISTORY_INDEX), json.dumps(
            {"stage": 1, "epoch": 0, "batch": 1, "step": 1, "time": 0, "file": "000000000.pickle"}))
    storage.atomic_write_pickle(storage.results_path(folder, storage.INPUT_IMAGES_FILE),
                                Exploit(marker))
    storage.write_run_status(str(folder), "finished", 0)
    assert pickle.loads(pickle.dumps(ExecExploit(tmp_path / "control"))) is None  # it would run
    assert (tmp_path / "control").exists()

    context = browser.new_context(storage_state=owner.request.storage_state())
    page = context.new_page()
    try:
        for technique in registry.SNAPSHOT_TECHNIQUES:
            page.goto("%s/scripts/%d/techniques/%s" % (servers.url, script_id, technique.key))
            texts = wait_for(lambda: [t for t in bokeh_state(page)["texts"]
                                      if t.startswith("Refused to read a results file")],
                             30, what="the refusal on the %s dashboard" % technique.title)
            assert "refused to load" in texts[0]
            screenshot(page, "abuse_refused_%s" % technique.key)
    finally:
        context.close()
    assert not marker.exists()
    # Flask's pages never unpickle results either.
    for url in ("/scripts/%d" % script_id, "/scripts/%d/output" % script_id):
        assert owner.get(url).status == 200
    assert not marker.exists()


def test_a_token_opens_only_the_technique_it_was_minted_for(owner, servers):
    token = session_token(owner, owner.script_id, "saliency_maps")
    assert autoload(owner, servers, token, "saliency_maps").status == 200
    for technique in registry.TECHNIQUES:
        if technique.key != "saliency_maps":
            assert autoload(owner, servers, token, technique.key).status == 403, technique.key


# --- Attacks from inside: mallory's uploaded scripts against alice and the servers -------
#
# Each attack is a small script of tests/e2e/attacks/, uploaded by mallory and run
# through the real runner; the facts an attacker can learn (paths, ports, pids, ids)
# replace its "__KNOWN__" placeholder. The scripts print what they got; the tests
# check from outside that it failed: alice's bytes unchanged and not served, her
# cookie not forged, the servers alive, no process of the run left.

ATTACKS_DIR = Path(__file__).resolve().parent / "attacks"
ALICE_STEM = "alice_secret"
ALICE_PASSWORD = "alice-password-1"
MALLORY_PASSWORD = "mallory-password-1"
ALICE_SOURCE_SECRET = "# alice's source secret 5d1e"
ALICE_OUTPUT_SECRET = "alice output secret 93b7"
ALICE_NETWORK = b"network of " + ALICE_STEM.encode()  # what fake_training saves
PASSWD_LINE = b"root:x:0:0"
RUN_DISK_MB = 200
HTTP_TIMEOUT_MS = 10000  # "answers within a few seconds": a hung read fails the test
DASHBOARD_TIMEOUT_S = 20
# A dashboard may grow the Bokeh server by this much at most; past the ceiling an
# attack that works is cut short (the server killed) to spare the shared machine.
BOKEH_GROWTH_LIMIT_MB = 500
BOKEH_GROWTH_CEILING_MB = 2500
FORK_ATTEMPTS = 2000
FILL_MB = 2500
# Visible Divs of the page's Bokeh documents: the dashboards' messages.
MESSAGES_JS = """() => {
  const texts = [];
  for (const doc of (window.Bokeh && window.Bokeh.documents) || []) {
    for (const model of doc.all_models) {
      if (model.type === "Div" && model.visible && model.text) { texts.push(model.text); }
    }
  }
  return texts;
}"""
TAG_PATTERN = re.compile(r'/tags/(\d+)/remove".*?title="Remove tag ([^"]+)"', re.DOTALL)
# The Bokeh state (BOKEH_STATE_JS) once the page shows a message or data, else null.
SETTLED_JS = """() => {
  const state = (%s)();
  state.messages = (%s)();
  return (state.images || state.progress > 0 || state.messages.length) ? state : null;
}""" % (BOKEH_STATE_JS, MESSAGES_JS)
Reply = collections.namedtuple("Reply", "status headers body")


@pytest.fixture(scope="module")
def attack_servers(tmp_path_factory):
    """Servers of this module's attacks: a small disk limit per run, room for three runs."""
    instance = Servers(tmp_path_factory.mktemp("attacked"), VISUALIZER_MAX_RUNS="3",
                       VISUALIZER_RUN_DISK_MB=str(RUN_DISK_MB),
                       VISUALIZER_USER_STORAGE_MB="4096", VISUALIZER_USER_MAX_SCRIPTS="100",
                       VISUALIZER_RUN_WALL_TIME_S="300")
    instance.start()
    yield instance
    instance.cleanup()


@pytest.fixture
def target(attack_servers):
    """The attack servers, started again when an attack before killed them."""
    if not attack_servers.alive():
        attack_servers.cleanup()
        attack_servers.start()
    return attack_servers


@pytest.fixture(scope="module")
def alice(playwright, attack_servers):
    """The victim: a finished run of alice_secret.py (image, output, results, network)."""
    user = WebUser(playwright, attack_servers, "alice_victim", ALICE_PASSWORD).register_and_login()
    source = (fake_training(ALICE_STEM, snapshots=3) + "print(%r)\n" % ALICE_OUTPUT_SECRET
              + ALICE_SOURCE_SECRET + "\n")
    user.script_id = user.upload_script(ALICE_STEM + ".py", source, tags="private")
    user.run(user.script_id, image=("digit.png", png_bytes()))
    assert user.wait_for_state(user.script_id, ENDED_STATES, 60)["state"] == "finished"
    user.folder = user.run_dir(user.script_id, ALICE_STEM)
    user.user_id = int(user.script_dir(ALICE_STEM).parent.name)
    user.tag_id = tag_ids(user, user.script_id)["private"]
    yield user
    user.request.dispose()


@pytest.fixture(scope="module")
def mallory(playwright, attack_servers):
    """The attacker, with one harmless script of her own."""
    user = WebUser(playwright, attack_servers, "mallory_attacker",
                   MALLORY_PASSWORD).register_and_login()
    user.script_id = user.upload_script("mallory_notes.py", "print('notes')\n")
    user.user_id = int(user.script_dir("mallory_notes").parent.name)
    yield user
    user.request.dispose()


@pytest.fixture
def alice_before(alice, tmp_path):
    """Alice's files (path -> digest) before the test; put back after it if an attack
    changed them, so that the next attack meets the same victim."""
    backup = tmp_path / "alice_backup"
    shutil.copytree(alice.folder, backup, symlinks=True)
    before = digests(alice.folder)
    yield before
    if digests(alice.folder) != before:
        if os.path.islink(alice.folder) or not os.path.isdir(alice.folder):
            os.unlink(alice.folder)
        else:
            shutil.rmtree(alice.folder)
        shutil.copytree(backup, alice.folder, symlinks=True)


def tag_ids(user, script_id):
    """{tag name: id} of a script's tags, read from its overview's remove buttons."""
    page = user.get("/scripts/%d" % script_id).text()
    return {name: int(number) for number, name in TAG_PATTERN.findall(page)}


def digests(folder):
    """{relative path: sha256 of a regular file, or where a link points}, links not followed."""
    found = {}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = os.path.join(root, name)
            key = os.path.relpath(path, folder)
            if os.path.islink(path):
                found[key] = "link to " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    found[key] = hashlib.sha256(f.read()).hexdigest()
    return found


def alice_secrets(servers):
    """Bytes that must never reach mallory: alice's source, output and network, the key."""
    return [ALICE_SOURCE_SECRET.encode(), ALICE_OUTPUT_SECRET.encode(), ALICE_NETWORK,
            servers.secret_key().encode()]


def known_facts(servers, alice, mallory, **extra):
    """What an attacker can learn: the servers' layout, ports and pids, alice's ids and folder."""
    facts = dict(instance_dir=str(servers.instance_dir),
                 database=str(servers.instance_dir / config.DATABASE_FILE),
                 storage_dir=str(servers.storage_dir), flask_port=servers.port,
                 bokeh_port=servers.bokeh_port, flask_pid=servers.pid,
                 bokeh_pids=servers.bokeh_pids(), alice_id=alice.user_id,
                 alice_script_id=alice.script_id, alice_stem=ALICE_STEM,
                 alice_dir=str(alice.folder), mallory_username=mallory.username)
    facts.update(extra)
    return facts


def launch_attack(mallory, name, known, stem=None):
    """Uploads tests/e2e/attacks/<name>.py as mallory's ``<stem>.py`` (``stem`` defaults to
    ``name``) and runs it; returns its id."""
    source = (ATTACKS_DIR / (name + ".py")).read_text().replace('"__KNOWN__"',
                                                                 repr(json.dumps(known)))
    script_id = mallory.upload_script((stem or name) + ".py", source)
    mallory.run(script_id)
    return script_id


def run_attack(mallory, name, known, timeout=60, stem=None):
    """Runs an attack to its end; returns (script id, run folder, what the script printed)."""
    script_id = launch_attack(mallory, name, known, stem)
    mallory.wait_for_state(script_id, ENDED_STATES, timeout)
    folder = mallory.run_dir(script_id, stem or name)
    return script_id, folder, attack_output(folder)


def attack_output(folder):
    """What the attack printed, read as a regular file only (attacks replace output.txt)."""
    for path in (folder / storage.OUTPUT_FILE, Path("%s-moved" % folder) / storage.OUTPUT_FILE,
                 folder / (storage.OUTPUT_FILE + ".replaced")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        with os.fdopen(fd, "rb") as f:
            if stat.S_ISREG(os.fstat(f.fileno()).st_mode) and not os.path.islink(path.parent):
                return f.read(2 ** 20).decode(errors="replace")
    return ""


def assert_attack_ran(output):
    assert "ATTACK-END" in output, "the attack script did not run to its end:\n" + output


def processes(predicate):
    """psutil processes for which ``predicate(process)`` is true (vanished ones skipped)."""
    found = []
    for process in psutil.process_iter():
        try:
            if predicate(process):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def named(marker):
    """Live processes whose first argument is ``marker`` (the attacks name their children)."""
    return processes(lambda p: p.status() != psutil.STATUS_ZOMBIE
                     and p.cmdline()[:1] == [marker])


def run_processes(folder):
    """Live processes of a run on the host: its folder in their environment, command or cwd."""
    folder = str(folder)

    def of_run(process):
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        if any(folder in argument for argument in process.cmdline()):
            return True
        if process.environ().get(storage.RUN_DIR_ENV, "").startswith(folder):
            return True
        try:
            return process.cwd().startswith(folder)
        except (psutil.AccessDenied, FileNotFoundError):
            return False
    return processes(of_run)


def run_uids(marker):
    """The user ids, other than the servers' own, that the processes named ``marker`` run as
    (a sandboxed run has a user id of its own)."""
    uids = set()
    for process in named(marker):
        with contextlib.suppress(psutil.NoSuchProcess):
            uids.add(process.uids().real)
    return uids - {os.getuid()}


def left_of_run(marker, folder, uids):
    """Live processes of a run: named ``marker``, of its ``folder``, or of one of its ``uids``."""
    found = {p.pid: p for p in named(marker) + run_processes(folder)}
    found.update((p.pid, p) for p in processes(lambda p: p.status() != psutil.STATUS_ZOMBIE
                                               and p.uids().real in uids))
    return list(found.values())


def kill_all(found):
    for process in found:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


class MemoryWatch:
    """Samples a process's resident memory in a thread while the ``with`` block runs.

    Args:
        pid: the process.
        ceiling_mb: growth past which the process is killed (``killed`` becomes True), so
            that an attack that works cannot exhaust the shared machine.
    """

    def __init__(self, pid, ceiling_mb):
        self.process = psutil.Process(pid)
        self.start = self.peak = self.process.memory_info().rss
        self.ceiling = ceiling_mb * 2 ** 20
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self):
        return (self.peak - self.start) / 2 ** 20

    def _watch(self):
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
                if self.peak - self.start > self.ceiling:
                    self.process.kill()
                    self.killed = True
                    return
            except psutil.NoSuchProcess:
                return


# --- plain HTTP from a chosen loopback address (throttling is per address) ----------------

def http(servers, method, path, source="127.0.0.1", headers=None, body=None, timeout=60):
    """One request to the Flask server from ``source`` (any 127.x.y.z), no redirect followed."""
    connection = http_client.HTTPConnection("127.0.0.1", servers.port, timeout=timeout,
                                            source_address=(source, 0))
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


def cookie_header(reply):
    jar = http_cookies.SimpleCookie()
    for value in reply.headers.get_all("Set-Cookie") or []:
        jar.load(value)
    return "; ".join("%s=%s" % (name, morsel.value) for name, morsel in jar.items())


def post_form(servers, path, fields, source):
    """GETs the form at ``path`` for its cookie and CSRF token, then POSTs ``fields``.

    Returns:
        (reply, seconds the POST took); the GET's reply and 0 if the form was refused.
    """
    form = http(servers, "GET", path, source)
    match = CSRF_PATTERN.search(form.body.decode(errors="replace"))
    if form.status != 200 or not match:
        return form, 0.0
    body = urllib.parse.urlencode(dict(fields, csrf_token=match.group(1)))
    started = time.perf_counter()
    reply = http(servers, "POST", path, source, body=body, headers={
        "Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie_header(form)})
    return reply, time.perf_counter() - started


def logged_in(reply):
    return reply.status == 302 and "/auth/login" not in reply.headers.get("Location", "")


def register(servers, username, password, source):
    reply, _ = post_form(servers, "/auth/register", {
        "username": username, "password": password, "confirm": password}, source)
    assert reply.status == 302, (username, reply.status, reply.body[:500])


def session_cookie_name(user):
    names = [c["name"] for c in user.request.storage_state()["cookies"] if "session" in c["name"]]
    assert len(names) == 1, names
    return names[0]


# --- the attacks ---------------------------------------------------------------------------

def test_a_script_cannot_read_the_secret_key_or_forge_alices_session(target, alice, mallory):
    known = known_facts(target, alice, mallory)
    _, _, output = run_attack(mallory, "steal_secret_key", known)
    assert_attack_ran(output)
    cookie_name = session_cookie_name(alice)
    for forged in re.findall(r"^FORGED (\S+)$", output, re.MULTILINE):
        for path in ("/", "/scripts/%d" % alice.script_id):
            reply = http(target, "GET", path, headers={"Cookie": "%s=%s" % (cookie_name, forged)})
            assert not (reply.status == 200 and alice.username.encode() in reply.body), (
                "a cookie forged with the stolen key opened alice's %s" % path)
    assert target.secret_key() not in output


def test_a_script_cannot_read_or_change_the_database(target, alice, mallory, tmp_path):
    database = target.instance_dir / config.DATABASE_FILE

    def account_rows():
        with contextlib.closing(sqlite3.connect("file:%s?mode=ro" % database, uri=True)) as db:
            hashes = dict(db.execute("SELECT username, password_hash FROM user"))
            owner_id = db.execute("SELECT user_id FROM script WHERE id = ?",
                                  (alice.script_id,)).fetchone()[0]
        return hashes, owner_id

    hashes, owner_id = account_rows()
    try:
        _, _, output = run_attack(mallory, "tamper_database", known_facts(target, alice, mallory))
        assert_attack_ran(output)
        assert hashes[alice.username] not in output and hashes[mallory.username] not in output
        assert account_rows() == (hashes, owner_id)
        alice_login, _ = post_form(target, "/auth/login", {
            "username": alice.username, "password": ALICE_PASSWORD}, "127.0.6.1")
        assert logged_in(alice_login)
        mallory_as_alice, _ = post_form(target, "/auth/login", {
            "username": alice.username, "password": MALLORY_PASSWORD}, "127.0.6.2")
        assert not logged_in(mallory_as_alice)
        assert alice.get("/scripts/%d" % alice.script_id).status == 200
        assert mallory.get("/scripts/%d" % alice.script_id).status == 404
    finally:  # an attack that worked must not spoil the next tests
        with contextlib.closing(sqlite3.connect(str(database))) as db:
            db.execute("UPDATE user SET password_hash = ? WHERE username = ?",
                       (hashes[alice.username], alice.username))
            db.execute("UPDATE script SET user_id = ? WHERE id = ?", (owner_id, alice.script_id))
            db.commit()


def test_a_script_cannot_read_or_overwrite_another_users_run_folder(target, alice, mallory,
                                                                      alice_before):
    known = known_facts(target, alice, mallory, alice_files=sorted(alice_before))
    _, _, output = run_attack(mallory, "raid_neighbour", known)
    assert_attack_ran(output)
    assert "OVERWROTE" not in output
    assert digests(alice.folder) == alice_before
    for secret in alice_secrets(target):
        assert secret.decode(errors="replace") not in output


def test_a_script_cannot_kill_the_servers_or_another_users_run(target, alice, mallory):
    script_id = alice.upload_script("alice_running.py", "import time\nwhile True:\n"
                                    "    print('alice trains', flush=True)\n    time.sleep(0.5)\n")
    alice.run(script_id)
    alice.wait_for_state(script_id, "running", 30)
    running_folder = alice.run_dir(script_id, "alice_running")
    alice_pids = wait_for(lambda: [p.pid for p in run_processes(running_folder)], 30,
                          what="the processes of alice's running run")
    bokeh_pids = target.bokeh_pids()
    known = known_facts(target, alice, mallory, alice_dir=str(running_folder),
                        alice_pids=alice_pids)
    attack_id = launch_attack(mallory, "kill_servers", known)
    folder = mallory.run_dir(attack_id, "kill_servers")
    try:
        # Watched from outside: the Flask server may not be there to report the run.
        output = wait_for(lambda: (lambda text: text if "ATTACK-END" in text else None)(
            attack_output(folder)), 60, what="the kill_servers attack to end")
        wait_for(lambda: not run_processes(folder), 30, what="mallory's run to end")
        assert target.process.poll() is None, output
        assert all(process_alive(pid) for pid in bokeh_pids), output
        assert all(process_alive(pid) for pid in alice_pids), output
        assert alice.status(script_id)["state"] == "running"
        assert alice.get("/").status == 200
    finally:
        if target.alive():
            alice.post("/scripts/%d/stop" % script_id, form={"csrf_token": alice.csrf_token()})
            alice.wait_for_state(script_id, ENDED_STATES, 30)
        kill_all(run_processes(running_folder))


def test_a_daemonized_child_does_not_outlive_stop(target, alice, mallory):
    marker = "mallory-escapee-%s" % uuid.uuid4().hex[:12]
    script_id = launch_attack(mallory, "escape_stop", known_facts(target, alice, mallory,
                                                                  marker=marker))
    folder = mallory.run_dir(script_id, "escape_stop")
    try:
        wait_for(lambda: "ESCAPED" in attack_output(folder), 60, what="the child to escape")
        assert named(marker), "the attack's daemon never ran"
        uids = run_uids(marker)
        response = mallory.post("/scripts/%d/stop" % script_id,
                                form={"csrf_token": mallory.csrf_token()})
        assert response.status == 302
        assert mallory.wait_for_state(script_id, ENDED_STATES, 30)["state"] == "stopped"
        wait_for(lambda: not left_of_run(marker, folder, uids), 20,
                 what=lambda: "no process of the run left, but: %s" % [
                     (p.pid, p.cmdline()) for p in left_of_run(marker, folder, uids)])
    finally:
        kill_all(left_of_run(marker, folder, ()))


def test_a_fork_bomb_is_bounded_and_cleaned_up(target, alice, mallory):
    marker = "mallory-fork-%s" % uuid.uuid4().hex[:12]
    script_id = launch_attack(mallory, "fork_bomb", known_facts(
        target, alice, mallory, marker=marker, attempts=FORK_ATTEMPTS))
    folder = mallory.run_dir(script_id, "fork_bomb")
    most, uids = 0, set()

    def bomb_went_off():
        nonlocal most
        most = max(most, len(named(marker)))
        uids.update(run_uids(marker))
        return ("ATTACK-END" in attack_output(folder)
                or mallory.status(script_id)["state"] in ENDED_STATES)

    try:
        wait_for(bomb_went_off, 90, interval=0.5, what="the fork bomb to go off")
        # The server answers alice while the bomb's processes are still there.
        assert alice.get("/", timeout=HTTP_TIMEOUT_MS).status == 200
        mallory.wait_for_state(script_id, ENDED_STATES, 60)
        output = attack_output(folder)
        record_measurement("fork_bomb_most_processes_seen", most)
        assert "FORKED %d" % FORK_ATTEMPTS not in output, output
        assert most < FORK_ATTEMPTS
        wait_for(lambda: not left_of_run(marker, folder, uids), 20,
                 what="the forked processes to be gone")
        assert alice.get("/", timeout=HTTP_TIMEOUT_MS).status == 200
    finally:
        kill_all(left_of_run(marker, folder, ()))


def test_a_disk_filler_is_stopped_and_marked_failed(target, alice, mallory):
    folder = target.storage_dir / str(mallory.user_id) / "fill_disk"  # and all its runs
    try:
        script_id, _, output = run_attack(mallory, "fill_disk", known_facts(
            target, alice, mallory, megabytes=FILL_MB), timeout=180)
        status = mallory.status(script_id)
        assert status["state"] == "failed", (status, output)
        assert "disk" in (status["message"] or "").lower(), status
        assert "WROTE ALL" not in output
        used = sum(os.path.getsize(os.path.join(root, name))
                   for root, _, names in os.walk(folder) for name in names)
        record_measurement("disk_filler_megabytes_written", used // 2 ** 20)
        # The limit is measured at each poll (README, Security model: known limits), so a fast
        # writer overshoots it on a loaded machine (902 MB over 200 MB seen in CI); stopped long
        # before the disk is full is the bound the sandbox and fault suites assert too.
        assert used < 2 * 2 ** 30
    finally:
        for filler in folder.rglob("filler-*.bin"):
            filler.unlink()


def test_a_script_cannot_connect_to_local_services(target, alice, mallory):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                connection, address = listener.accept()
            except socket.timeout:
                continue
            accepted.append(address)
            connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    targets = {"flask": ("127.0.0.1", target.port), "bokeh": ("127.0.0.1", target.bokeh_port),
               "other service": ("127.0.0.1", port)}
    for name, addresses in psutil.net_if_addrs().items():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                targets["other service on " + name] = (address.address, port)
    try:
        _, _, output = run_attack(mallory, "reach_network", known_facts(
            target, alice, mallory, targets=targets))
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert_attack_ran(output)
    assert accepted == []
    assert "CONNECTED" not in output, output
    for name in targets:
        assert "REFUSED %s " % name in output, output


# --- Hostile run folders: links and special files that mallory's script plants ------------

def mallory_urls(script_id):
    base = "/scripts/%d" % script_id
    return [base, base + "/output", base + "/output.json", base + "/output/download",
            base + "/network"] + [base + "/images/" + name for name in (
                "secret.png", "passwd.png", "hard_secret.png")]


def dashboard_settled(page):
    """The page's Bokeh state once it shows a message or data (AssertionError after
    DASHBOARD_TIMEOUT_S); waited for in the browser, so a busy page cannot stall the test."""
    try:
        return page.wait_for_function(SETTLED_JS, timeout=DASHBOARD_TIMEOUT_S * 1000).json_value()
    except PlaywrightError as error:
        raise AssertionError("no message or data on %s: %s" % (page.url, error)) from None


def assert_serves_nothing_of_alice(servers, mallory, script_id, browser):
    """Mallory's pages, downloads and dashboards answer, and show none of alice's bytes."""
    secrets = alice_secrets(servers) + [PASSWD_LINE]
    for url in mallory_urls(script_id):
        body = mallory.get(url, timeout=HTTP_TIMEOUT_MS).body()
        for secret in secrets:
            assert secret not in body, (url, secret)
    context = browser.new_context(storage_state=mallory.request.storage_state())
    context.set_default_timeout(HTTP_TIMEOUT_MS)
    try:
        for technique in registry.TECHNIQUES:
            page = context.new_page()
            page.goto("%s/scripts/%d/techniques/%s" % (servers.url, script_id, technique.key))
            state = dashboard_settled(page)
            screenshot(page, "abuse_links_%d_%s" % (script_id, technique.key))
            assert state["images"] == 0 and state["progress"] <= 0, (technique.key, state)
            page.close()
    finally:
        context.close()


@pytest.mark.slow
def test_links_in_a_run_folder_serve_nothing_outside_it(target, alice, mallory, browser,
                                                        alice_before):
    script_id, _, output = run_attack(mallory, "plant_links", known_facts(target, alice, mallory))
    assert_attack_ran(output)
    assert_serves_nothing_of_alice(target, mallory, script_id, browser)
    assert digests(alice.folder) == alice_before


@pytest.mark.slow
def test_a_run_folder_swapped_for_a_link_reads_and_clears_nothing_of_alice(
        target, alice, mallory, browser, alice_before):
    script_id, folder, output = run_attack(mallory, "swap_run_folder",
                                           known_facts(target, alice, mallory))
    moved = Path("%s-moved" % folder)
    try:
        assert_attack_ran(output)
        assert_serves_nothing_of_alice(target, mallory, script_id, browser)
        # Running it again makes a new run folder; nothing of alice is read or cleared.
        mallory.run(script_id, image=("digit.png", png_bytes()))
        mallory.wait_for_state(script_id, ENDED_STATES, 60)
        assert digests(alice.folder) == alice_before
    finally:
        if moved.is_dir():
            if folder.is_symlink():
                folder.unlink()
            os.replace(moved, folder)


def release_special_files(folder):
    """Lets every read blocked on a named pipe of ``folder`` end, then removes the pipes
    and links, so a server that hung on them gets free."""
    for _ in range(3):
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                if stat.S_ISFIFO(os.lstat(path).st_mode):
                    with contextlib.suppress(OSError):
                        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        time.sleep(0.3)
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISFIFO(mode) or stat.S_ISLNK(mode):
                os.unlink(path)


@pytest.mark.slow
def test_pipes_and_endless_files_neither_hang_nor_grow_the_servers(target, alice, mallory,
                                                                   browser):
    script_id, folder, output = run_attack(mallory, "plant_special_files",
                                           known_facts(target, alice, mallory))
    assert_attack_ran(output)
    alice_token = session_token(alice, alice.script_id)
    context = browser.new_context(storage_state=mallory.request.storage_state())
    context.set_default_timeout(HTTP_TIMEOUT_MS)
    hung, silent = [], []
    try:
        with MemoryWatch(target.bokeh_pids()[0], BOKEH_GROWTH_CEILING_MB) as bokeh_memory:
            for url in mallory_urls(script_id)[:4]:
                try:
                    mallory.get(url, timeout=HTTP_TIMEOUT_MS)
                except PlaywrightError as error:
                    hung.append("%s: %s" % (url, error))
            for technique in registry.TECHNIQUES:
                page = context.new_page()
                try:
                    page.goto("%s/scripts/%d/techniques/%s"
                              % (target.url, script_id, technique.key))
                    dashboard_settled(page)
                except (PlaywrightError, AssertionError) as error:
                    silent.append("%s: %s" % (technique.key, str(error)[:300]))
                # Alice's dashboard still opens meanwhile.
                try:
                    if autoload(alice, target, alice_token).status != 200:
                        hung.append("alice's dashboard while %s was open" % technique.key)
                except PlaywrightError as error:
                    hung.append("alice's dashboard while %s was open: %s" % (technique.key,
                                                                              error))
                page.close()
        record_measurement("bokeh_growth_mb_special_files", round(bokeh_memory.growth_mb))
    finally:
        release_special_files(folder)
        context.close()
    assert not bokeh_memory.killed, "the Bokeh server grew past %d MB" % BOKEH_GROWTH_CEILING_MB
    assert hung == [] and silent == [], (hung, silent)
    assert bokeh_memory.growth_mb < BOKEH_GROWTH_LIMIT_MB
    assert target.alive()


@pytest.mark.parametrize("side", [6000, 3000])  # over the cap on a file read / on drawing
def test_a_huge_result_array_is_capped_with_a_message(target, alice, mallory, browser, side):
    """Three sessions of one side x side result, as three tabs open them, pulled over the
    dashboard's websocket first: a browser drawing the uncapped array would stall the test.
    Once they are capped, the tab shows the message in Chromium too."""
    script_id, _, output = run_attack(mallory, "big_result", known_facts(
        target, alice, mallory, side=side), timeout=120, stem="big_result_%d" % side)
    assert_attack_ran(output)
    documents = []
    with MemoryWatch(target.bokeh_pids()[0], BOKEH_GROWTH_CEILING_MB) as bokeh_memory:
        for _ in range(3):
            token = session_token(mallory, script_id, "saliency_maps")
            minted = WEBSOCKET_TOKEN_PATTERN.search(autoload(mallory, target, token).text())
            documents.append(websocket_document(target, minted.group(1)))
    record_measurement("bokeh_growth_mb_three_sessions_of_%d_squared" % side,
                       round(bokeh_memory.growth_mb))
    assert not bokeh_memory.killed, "the Bokeh server grew past %d MB" % BOKEH_GROWTH_CEILING_MB
    assert bokeh_memory.growth_mb < BOKEH_GROWTH_LIMIT_MB
    for document in documents:
        assert document is not None
        assert re.search(r"larger than|at most", document), document[:2000]
    context = browser.new_context(storage_state=mallory.request.storage_state())
    try:
        page = context.new_page()
        page.goto("%s/scripts/%d/techniques/saliency_maps" % (target.url, script_id))
        state = dashboard_settled(page)
        screenshot(page, "abuse_huge_result_%d" % side)
    finally:
        context.close()
    assert state["images"] == 0
    assert [t for t in state["messages"] if re.search(r"larger than|at most", t)], state


# --- Accounts and requests --------------------------------------------------------------------
# Each test logs in from its own loopback addresses, so one test's throttling does not
# reach another's.

def test_repeated_wrong_passwords_are_throttled_long_before_two_hundred(target, alice):
    register(target, "throttle_victim", "throttle-password-1", "127.0.7.1")
    statuses = []
    for attempt in range(200):
        reply, _ = post_form(target, "/auth/login", {"username": "throttle_victim",
                                                      "password": "wrong-%d" % attempt},
                             "127.0.7.2")
        statuses.append(reply.status)
        if reply.status == 429:
            break
    assert statuses[-1] == 429, statuses
    assert len(statuses) <= 10, statuses
    assert re.search(rb"too many|try again", reply.body, re.I), reply.body[:2000]
    again, _ = post_form(target, "/auth/login", {"username": "throttle_victim",
                                                  "password": "wrong-again"}, "127.0.7.2")
    assert again.status == 429
    # Others log in as before.
    other, _ = post_form(target, "/auth/login", {"username": alice.username,
                                                  "password": ALICE_PASSWORD}, "127.0.7.3")
    assert logged_in(other)


def test_wrong_passwords_take_as_long_for_unknown_names_as_for_known_ones(target):
    tries = 15
    for number in range(tries):
        register(target, "timing_known_%02d" % number, "timing-password-1", "127.0.8.%d"
                 % (number + 1))
    known, unknown = [], []
    for number in range(tries):
        # one wrong password per name and per address: no throttling gets in the way
        reply, seconds = post_form(target, "/auth/login", {
            "username": "timing_known_%02d" % number, "password": "wrong-password-1"},
            "127.0.9.%d" % (number + 1))
        assert reply.status == 200, reply.status
        known.append(seconds)
        reply, seconds = post_form(target, "/auth/login", {
            "username": "timing_nobody_%02d" % number, "password": "wrong-password-1"},
            "127.0.10.%d" % (number + 1))
        assert reply.status == 200, reply.status
        unknown.append(seconds)
    ratio = statistics.median(known) / statistics.median(unknown)
    record_measurement("login_time_known_to_unknown_name_ratio", round(ratio, 2))
    assert 0.5 < ratio < 2, (known, unknown)


def test_a_session_cookie_copied_before_logout_no_longer_works_after(target, playwright):
    user = WebUser(playwright, target, "revoked_user").register_and_login()
    try:
        copied = user.request.storage_state()
        assert user.get("/").status == 200
        response = user.post("/auth/logout", form={"csrf_token": user.csrf_token()})
        assert response.status == 302
        replay = playwright.request.new_context(base_url=target.url, storage_state=copied)
        try:
            response = replay.get("/", max_redirects=0)
            assert response.status == 302
            assert response.headers["location"].startswith("/auth/login")
        finally:
            replay.dispose()
    finally:
        user.request.dispose()


def test_a_200_mb_login_body_is_refused_before_it_is_read(target):
    size = 200 * 2 ** 20
    rss_before = target.rss_kb()
    with socket.create_connection(("127.0.0.1", target.port), timeout=10) as connection:
        connection.sendall(b"POST /auth/login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Type: application/x-www-form-urlencoded\r\n"
                           b"Content-Length: %d\r\n\r\n" % size)
        # Nothing of the body is sent yet: the answer must come from the headers alone.
        readable, _, _ = select.select([connection], [], [], 5)
        assert readable, "no answer within 5 s: the server waits to read the 200 MB body"
        answer = connection.recv(4096)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 413"), answer[:200]
        sent = 0
        with contextlib.suppress(OSError):
            chunk = b"x" * 2 ** 20
            while sent < size:
                connection.sendall(chunk)
                sent += len(chunk)
    record_measurement("oversized_login_body_megabytes_accepted", sent // 2 ** 20)
    assert sent < size
    assert target.rss_kb() - rss_before < 50 * 1024
    assert http(target, "GET", "/auth/login").status == 200


def test_a_tag_name_another_user_has_gets_its_own_id(target, alice, mallory):
    response = mallory.post("/scripts/%d/tags" % mallory.script_id,
                            form={"csrf_token": mallory.csrf_token(), "tags": "private"})
    assert response.status == 302
    assert tag_ids(mallory, mallory.script_id)["private"] != alice.tag_id
    response = mallory.post("/scripts/%d/tags/%d/remove" % (mallory.script_id, alice.tag_id),
                            form={"csrf_token": mallory.csrf_token()})
    assert response.status == 404
    assert "private" in tag_ids(alice, alice.script_id)
