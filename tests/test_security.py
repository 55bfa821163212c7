"""Ownership (404 for another user's ids), CSRF, the upload size limit, cookies and settings."""
import io
import os
import re
import stat

import pytest
from conftest import make_test_config, newest_run_folder, png_bytes, upload_script

from visualizer import config, create_app
from visualizer.models import Run, Script, Tag, User, db

OTHER_USERS_URLS = [
    ("get", "/scripts/1"), ("get", "/scripts/1/output"), ("get", "/scripts/1/output.json"),
    ("get", "/scripts/1/status.json"), ("get", "/scripts/1/output/download"),
    ("get", "/scripts/1/network"), ("get", "/scripts/1/images/digit.png"),
    ("get", "/scripts/1/techniques/saliency_maps"), ("post", "/scripts/1/run"),
    ("post", "/scripts/1/stop"), ("post", "/scripts/1/delete"), ("post", "/scripts/1/tags"),
    ("post", "/scripts/1/tags/1/remove"),
]


@pytest.fixture
def others_script(app, client, auth):
    """Alice owns script 1 with an image, output and a network; Bob is logged in."""
    auth.register_and_login("alice_1")
    upload_script(client, "secret.py", tags="private")
    client.post("/scripts/1/run", data={"images": "new", "image": (io.BytesIO(png_bytes()), "digit.png")},
                content_type="multipart/form-data")
    folder = os.path.join(app.config["STORAGE_DIR"], "1", "secret")
    os.makedirs(os.path.join(folder, "networks"))
    for name in ("output.txt", os.path.join("networks", "secret.keras")):
        with open(os.path.join(folder, name), "w") as f:
            f.write("alice's data")
    auth.logout()
    auth.register_and_login("bobby_2")
    return folder


@pytest.mark.parametrize("method, url", OTHER_USERS_URLS)
def test_another_users_ids_get_404(app, client, others_script, method, url):
    before = sorted(os.listdir(others_script))
    response = getattr(client, method)(url, data={"tags": "stolen", "images": "keep"})
    assert response.status_code == 404
    page = response.get_data(as_text=True)
    assert "secret" not in page and "alice" not in page
    assert sorted(os.listdir(others_script)) == before
    with app.app_context():
        assert [t.name for t in db.session.get(Script, 1).tags] == ["private", "secret"]
        assert Run.query.count() == 1
    assert app.extensions["runner"].stopped == []


def test_missing_ids_get_404(client, auth):
    auth.register_and_login()
    assert client.get("/scripts/99").status_code == 404
    assert client.get("/scripts/abc").status_code == 404


@pytest.fixture
def csrf_app(tmp_path):
    return create_app(make_test_config(tmp_path, WTF_CSRF_ENABLED=True))


def csrf_token(client, path):
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).get_data(as_text=True)).group(1)


def test_post_without_csrf_token_is_refused_and_writes_nothing(csrf_app):
    client = csrf_app.test_client()
    response = client.post("/auth/register", data={
        "username": "alice_1", "password": "password123", "confirm": "password123"})
    assert response.status_code == 400
    assert "missing its security token" in response.get_data(as_text=True)
    with csrf_app.app_context():
        assert User.query.count() == 0
    token = csrf_token(client, "/auth/register")
    client.post("/auth/register", data={"username": "alice_1", "password": "password123",
                                        "confirm": "password123", "csrf_token": token})
    response = upload_script(client, "sneaky.py")
    assert response.status_code == 400
    with csrf_app.app_context():
        assert User.query.count() == 1 and Script.query.count() == 0
    assert os.listdir(csrf_app.config["STORAGE_DIR"]) == []
    token = csrf_token(client, "/upload")
    response = client.post("/upload", data={"file": (io.BytesIO(b"x = 1\n"), "ok.py"), "tags": "",
                                            "csrf_token": token}, content_type="multipart/form-data")
    assert response.status_code == 302
    assert client.post("/scripts/1/delete").status_code == 400
    assert client.post("/scripts/1/run", data={"images": "none"}).status_code == 400
    with csrf_app.app_context():
        assert Script.query.count() == 1 and Run.query.count() == 0


def test_upload_over_size_limit_gets_413_and_writes_nothing(tmp_path):
    app = create_app(make_test_config(tmp_path, MAX_CONTENT_LENGTH=1024))
    client = app.test_client()
    client.post("/auth/register", data={"username": "alice_1", "password": "password123",
                                        "confirm": "password123"})
    client.post("/auth/login", data={"username": "alice_1", "password": "password123"})
    response = upload_script(client, "big.py", "x = 1\n" * 1000)
    assert response.status_code == 413
    assert "larger than the limit of 0.000976562 MB" in response.get_data(as_text=True)
    with app.app_context():
        assert Script.query.count() == 0 and Tag.query.count() == 0
    assert os.listdir(app.config["STORAGE_DIR"]) == []


def test_session_cookie_is_httponly_and_samesite_lax(client, auth):
    auth.register()
    response = auth.login()
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_settings_from_environment():
    settings = config.settings_from_env({
        "VISUALIZER_HOST": "0.0.0.0", "VISUALIZER_PORT": "8000", "VISUALIZER_MAX_UPLOAD_MB": "5",
        "VISUALIZER_RUN_WALL_TIME_S": "3600", "VISUALIZER_STORAGE": "/data/runs"})
    assert settings["HOST"] == "0.0.0.0" and settings["PORT"] == 8000
    assert settings["MAX_CONTENT_LENGTH"] == 5 * 1024 * 1024
    assert settings["RUN_WALL_TIME_S"] == 3600 and settings["RUN_MEMORY_MB"] is None
    assert settings["STORAGE_DIR"] == "/data/runs" and settings["MAX_CONCURRENT_RUNS"] == 2
    defaults = config.settings_from_env({})
    assert defaults["STORAGE_DIR"] == os.path.join(config.REPO_ROOT, "user_storage")
    assert defaults["MAX_CONTENT_LENGTH"] == 20 * 1024 * 1024
    with pytest.raises(ValueError, match="VISUALIZER_PORT must be a number, got 'abc'"):
        config.settings_from_env({"VISUALIZER_PORT": "abc"})
    with pytest.raises(ValueError, match="VISUALIZER_MAX_RUNS must be positive"):
        config.settings_from_env({"VISUALIZER_MAX_RUNS": "0"})


def test_derived_settings_and_secret_key_file(tmp_path):
    settings = config.settings_from_env({"VISUALIZER_INSTANCE": str(tmp_path / "inst"),
                                         "VISUALIZER_BOKEH_PORT": "7000"})
    settings = config.complete_settings(settings)
    key_file = tmp_path / "inst" / "secret_key"
    assert settings["BOKEH_URL"] == "http://127.0.0.1:7000"
    assert settings["SQLALCHEMY_DATABASE_URI"] == "sqlite:///%s" % (tmp_path / "inst" / "visualizer.sqlite")
    assert len(settings["SECRET_KEY"]) >= 64 and key_file.read_text() == settings["SECRET_KEY"]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert config.load_or_create_secret_key(str(tmp_path / "inst")) == settings["SECRET_KEY"]


# Headers of every response, Secure cookies behind TLS.

def test_every_response_carries_the_security_headers(client, auth):
    auth.register_and_login()
    for path in ("/auth/login", "/", "/scripts/99", "/static/style.css"):
        headers = client.get(path).headers
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "same-origin"
        assert "Strict-Transport-Security" not in headers
        policy = dict(part.split(" ", 1) for part in headers["Content-Security-Policy"].split("; "))
        assert policy["frame-ancestors"] == "'none'"
        assert policy["default-src"] == "'self'" and policy["object-src"] == "'none'"
        assert re.fullmatch(r"'self' 'nonce-[\w-]{24}' http://bokeh\.test:5006 blob:",
                            policy["script-src"])
        assert policy["connect-src"] == "'self' http://bokeh.test:5006 ws://bokeh.test:5006"


def test_the_dashboards_inline_script_carries_this_responses_nonce(app, client, auth):
    auth.register_and_login()
    upload_script(client, "plotted.py")
    newest_run_folder(app, 1)  # a run whose dashboard the tab embeds
    nonces = []
    for _ in range(2):
        response = client.get("/scripts/1/techniques/saliency_maps")
        nonce = re.search(r"'nonce-([\w-]+)'", response.headers["Content-Security-Policy"]).group(1)
        page = response.get_data(as_text=True)
        assert '<script nonce="%s" id=' % nonce in page
        assert page.count("<script") == page.count("<script nonce=") + 1  # + app.js by URL
        nonces.append(nonce)
    assert nonces[0] != nonces[1]


def test_with_https_cookies_are_secure_and_hsts_is_sent(tmp_path):
    app = create_app(make_test_config(tmp_path, HTTPS=True, BOKEH_URL="https://bokeh.test"))
    client = app.test_client()
    # creating a user logs them in: that answer sets the session cookie
    response = client.post("/auth/register", data={
        "username": "alice_1", "password": "password123", "confirm": "password123"},
        base_url="https://localhost")
    assert "Secure" in response.headers["Set-Cookie"]
    assert response.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert app.config["REMEMBER_COOKIE_SECURE"] is True
    assert "connect-src 'self' https://bokeh.test wss://bokeh.test" in response.headers[
        "Content-Security-Policy"]


def test_without_https_cookies_are_not_marked_secure(client, auth):
    auth.register()
    assert "Secure" not in auth.login().headers["Set-Cookie"]


def test_the_https_setting_takes_0_or_1_only():
    assert config.settings_from_env({"VISUALIZER_HTTPS": "1"})["HTTPS"] is True
    assert config.settings_from_env({})["HTTPS"] is False
    with pytest.raises(ValueError, match="VISUALIZER_HTTPS must be 0 or 1, got 'yes'"):
        config.settings_from_env({"VISUALIZER_HTTPS": "yes"})


# Tags belong to one user.

def test_two_users_tags_of_one_name_are_separate_rows(app, client, auth):
    auth.register_and_login("alice_1")
    upload_script(client, "a.py", tags="project_x")
    auth.logout()
    auth.register_and_login("bobby_2")
    upload_script(client, "b.py")
    client.post("/scripts/2/tags", data={"tags": "project_x"})
    with app.app_context():
        owners = sorted((t.user_id, t.name) for t in Tag.query.filter_by(name="project_x"))
        assert owners == [(1, "project_x"), (2, "project_x")]
        bobs = [t for t in db.session.get(Script, 2).tags if t.name == "project_x"][0]
    assert bobs.user_id == 2


def test_another_users_tag_id_gets_404_on_ones_own_script_and_stays(app, client, auth):
    auth.register_and_login("alice_1")
    upload_script(client, "a.py", tags="private")
    with app.app_context():
        alices_tag = Tag.query.filter_by(user_id=1, name="private").one().id
    auth.logout()
    auth.register_and_login("bobby_2")
    upload_script(client, "b.py", tags="private")
    response = client.post("/scripts/2/tags/%d/remove" % alices_tag)
    assert response.status_code == 404
    assert "private" not in response.get_data(as_text=True)
    with app.app_context():
        assert [t.name for t in db.session.get(Script, 1).tags] == ["a", "private"]
        assert sorted(t.name for t in db.session.get(Script, 2).tags) == ["b", "private"]
