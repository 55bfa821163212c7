"""Abuse against the real servers: a second user, forged Bokeh tokens, bad requests.

The owner has a finished run (script, image, output, results, network). The
intruder, another logged-in user, tries every URL of it, and every Bokeh token
it could forge or replay; then come requests without CSRF tokens, oversized
and malformed uploads, ``../`` names, and results pickles crafted to run code.
Everything must be refused, nothing written, nothing executed.
"""
import asyncio
import json
import os
import pickle
import re
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest
from bokeh.util.token import generate_jwt_token, generate_session_id, get_token_payload
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from custom_keras import registry, storage
from e2e.harness import (WebUser, bokeh_state, fake_training, files_under, png_bytes,
                         screenshot, wait_for)

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
    user.user_id = int(user.folder.parent.name)
    yield user
    user.request.dispose()


@pytest.fixture(scope="module")
def intruder(playwright, servers):
    user = WebUser(playwright, servers, "intruder_user").register_and_login()
    user.script_id = user.upload_script("mine.py", "print('mine')\n")
    user.folder = user.run_dir(user.script_id, "mine")
    user.user_id = int(user.folder.parent.name)
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
    return user.request.get(app_url + "/autoload.js?" + query, headers=headers)


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
    owner_run = "%d/%s" % (owner.user_id, OWNER_STEM)
    intruder_run = "%d/mine" % intruder.user_id
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
    images = intruder.folder.parent / "escape_e2e" / "images"
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
    for number, technique in enumerate(registry.TECHNIQUES[1:]):
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
        for technique in registry.TECHNIQUES[1:]:
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
