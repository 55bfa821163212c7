"""Creating users, logging in and out (throttled, sessions revocable server-side), changing
the password, and the login redirect with a safe `next`."""
import datetime

import pytest
from conftest import AuthActions, make_test_config

from visualizer import auth as auth_module
from visualizer import create_app
from visualizer.auth import safe_next_url
from visualizer.models import LoginSession, LoginThrottle, User, db, utcnow


def user_count(app):
    with app.app_context():
        return User.query.count()


def test_register_creates_user_with_salted_hash(app, client, auth):
    response = auth.register("alice_1", "password123")
    assert response.status_code == 302 and response.headers["Location"] == "/"
    auth.register("bob_22", "password123")
    with app.app_context():
        alice = User.query.filter_by(username="alice_1").one()
        bob = User.query.filter_by(username="bob_22").one()
        assert alice.password_hash != "password123"
        assert alice.password_hash != bob.password_hash  # salted
        assert alice.check_password("password123") and not alice.check_password("password124")


def test_creating_a_user_logs_them_in(client):
    response = client.post("/auth/register", data={
        "username": "dana_4", "password": "password123", "confirm": "password123"},
        follow_redirects=True)
    assert "User dana_4 created; you are logged in." in response.get_data(as_text=True)
    assert client.get("/").status_code == 200  # the file list, not the login page


@pytest.mark.parametrize("username, password, confirm, message", [
    ("abc", "password123", None, "Username must be 5 to 20 characters long"),
    ("a" * 21, "password123", None, "Username must be 5 to 20 characters long"),
    ("bad name!", "password123", None, "only letters, digits and underscores"),
    ("carol_3", "short", None, "Password must be at least 8 characters long."),
    ("carol_3", "password123", "password321", "The two passwords do not match."),
])
def test_register_refuses_bad_input(app, client, auth, username, password, confirm, message):
    response = auth.register(username, password, confirm)
    assert response.status_code == 200
    assert message in response.get_data(as_text=True)
    assert user_count(app) == 0


def test_register_refuses_duplicate_username_in_any_case(app, client, auth):
    auth.register("alice_1")
    response = auth.register("ALICE_1")
    assert "Username ALICE_1 is already taken" in response.get_data(as_text=True)
    assert user_count(app) == 1


def test_login_and_logout(client, auth):
    auth.register()
    response = auth.login()
    assert response.status_code == 302 and response.headers["Location"] == "/"
    page = client.get("/").get_data(as_text=True)
    assert "Logged in as <strong>alice_1</strong>" in page
    auth.logout()
    assert client.get("/").headers["Location"].startswith("/auth/login")


def test_login_refuses_wrong_password_and_unknown_user(client, auth):
    auth.register()
    for username, password in (("alice_1", "wrongpass1"), ("nobody_1", "password123")):
        response = auth.login(username, password)
        assert response.status_code == 200
        assert "Incorrect username or password." in response.get_data(as_text=True)
    assert client.get("/").status_code == 302


@pytest.mark.parametrize("path", ["/", "/upload", "/scripts/1", "/scripts/1/output",
                                  "/scripts/1/output.json", "/scripts/1/network",
                                  "/scripts/1/techniques/saliency_maps"])
def test_anonymous_visitor_goes_to_login(client, path):
    response = client.get(path)
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/auth/login")


def test_login_returns_to_the_page_asked_for(client, auth):
    auth.register()
    response = client.get("/upload?x=1")
    assert response.headers["Location"] == "/auth/login?next=/upload?x%3D1"
    login_page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert 'name="next" value="/upload?x=1"' in login_page
    response = auth.login(next_url="/upload?x=1")
    assert response.headers["Location"] == "/upload?x=1"


@pytest.mark.parametrize("target", ["http://evil.example/", "//evil.example/x", "/\\evil.example",
                                    "javascript:alert(1)", "upload"])
def test_login_ignores_unsafe_next(client, auth, target):
    auth.register()
    response = auth.login(next_url=target)
    assert response.headers["Location"] == "/"


def test_safe_next_url():
    assert safe_next_url("/scripts/3?tab=1") == "/scripts/3?tab=1"
    assert safe_next_url("https://example.com/") is None
    assert safe_next_url("///example.com") is None
    assert safe_next_url(None) is None


def test_logged_in_user_skips_login_and_register(client, auth):
    auth.register_and_login()
    assert client.get("/auth/login").headers["Location"] == "/"
    assert client.get("/auth/register").headers["Location"] == "/"


def test_logout_needs_post(client, auth):
    auth.register_and_login()
    assert client.get("/auth/logout").status_code == 405


# Throttling: 5 failures lock a name or an address, for 1 s, 2 s, 4 s ... at most 15 min.

def fail_logins(auth, count, username="alice_1", address="10.0.0.1"):
    return [auth.login(username, "wrongpass%d" % i, address=address).status_code
            for i in range(count)]


def throttle_row(app, scope, key):
    with app.app_context():
        row = db.session.get(LoginThrottle, (scope, key))
        return None if row is None else (row.failures, row.locked_until, row.last_failure_at)


def expire_lockouts(app):
    """Moves every lock-out into the past, as if the user had waited."""
    with app.app_context():
        for row in LoginThrottle.query.all():
            if row.locked_until is not None:
                row.locked_until = utcnow() - datetime.timedelta(seconds=1)
        db.session.commit()


def test_a_sixth_login_after_five_failures_gets_429_and_says_when_to_try_again(app, client, auth):
    auth.register()
    assert fail_logins(auth, 5) == [200] * 5
    response = auth.login(address="10.0.0.1")  # the right password, but locked
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"
    assert ("Too many failed logins for this user name. Try again in 1 second"
            in response.get_data(as_text=True))
    assert client.get("/").status_code == 302  # not logged in


def test_each_further_failure_doubles_the_lockout_up_to_15_minutes(app, client, auth):
    auth.register()
    fail_logins(auth, 5)
    lockouts = []
    for _ in range(13):
        expire_lockouts(app)
        assert auth.login("alice_1", "wrongpass", address="10.0.0.1").status_code == 200
        failures, locked_until, failed_at = throttle_row(app, "name", "alice_1")
        lockouts.append(round((locked_until - failed_at).total_seconds()))
    assert lockouts == [2, 4, 8, 16, 32, 64, 128, 256, 512, 900, 900, 900, 900]
    response = auth.login(address="10.0.0.1")
    assert response.status_code == 429
    assert "Try again in 15 minutes" in response.get_data(as_text=True)


def test_an_address_that_fails_five_times_is_locked_for_every_name(app, client, auth):
    auth.register()
    for i in range(5):
        auth.login("nobody_%d" % i, "password123", address="10.0.0.66")
    response = auth.login(address="10.0.0.66")
    assert response.status_code == 429
    assert "Too many failed logins for your address" in response.get_data(as_text=True)
    assert auth.login(address="10.0.0.7").status_code == 302  # another address logs in


def test_a_lockout_survives_a_restart_of_the_server(app, client, auth, tmp_path):
    auth.register()
    fail_logins(auth, 5)
    restarted = create_app(make_test_config(tmp_path)).test_client()
    response = AuthActions(restarted).login(address="10.0.0.1")
    assert response.status_code == 429


def test_a_successful_login_clears_the_names_failures_but_not_the_addresses(app, client, auth):
    auth.register()
    fail_logins(auth, 4)
    assert auth.login(address="10.0.0.1").status_code == 302
    assert throttle_row(app, "name", "alice_1") is None
    assert throttle_row(app, "address", "10.0.0.1")[0] == 4


def test_a_lockout_counts_the_name_in_any_case(app, client, auth):
    auth.register()
    for number, username in enumerate(("alice_1", "ALICE_1", "Alice_1", "aLiCe_1", "alicE_1")):
        auth.login(username, "wrongpass", address="10.0.1.%d" % number)
    assert throttle_row(app, "name", "alice_1")[0] == 5
    assert auth.login(address="10.0.1.9").status_code == 429


def test_an_unknown_name_costs_one_password_hash_like_a_known_name(app, client, auth, monkeypatch):
    auth.register()
    checked = []
    original = auth_module.check_password_hash
    monkeypatch.setattr(auth_module, "check_password_hash",
                        lambda hashed, password: checked.append(hashed) or original(hashed,
                                                                                    password))
    with app.app_context():
        alice_hash = User.query.filter_by(username="alice_1").one().password_hash
    auth.login("nobody_1", "password123")
    assert checked == [auth_module.DUMMY_PASSWORD_HASH]
    assert auth_module.DUMMY_PASSWORD_HASH.split("$")[0] == alice_hash.split("$")[0]  # same method


# Sessions kept server-side: logout and a password change revoke them.

def session_cookie(client):
    return client.get_cookie("session").value


def client_with_cookie(app, value):
    other = app.test_client()
    other.set_cookie("session", value)
    return other


def test_a_session_cookie_copied_before_logout_no_longer_works_after_it(app, client, auth):
    auth.register_and_login()
    copied = session_cookie(client)
    assert client_with_cookie(app, copied).get("/").status_code == 200
    auth.logout()
    assert client_with_cookie(app, copied).get("/").headers["Location"].startswith("/auth/login")
    with app.app_context():
        assert LoginSession.query.count() == 0


def test_each_login_is_a_session_row_of_its_own(app, client, auth):
    auth.register_and_login()
    AuthActions(app.test_client()).login()
    with app.app_context():
        assert LoginSession.query.filter_by(user_id=1).count() == 2


def test_a_password_change_logs_out_every_other_session_and_keeps_this_one(app, client, auth):
    auth.register_and_login()
    laptop = app.test_client()
    AuthActions(laptop).login()
    assert laptop.get("/").status_code == 200
    response = client.post("/auth/password", data={
        "current": "password123", "password": "new password 9", "confirm": "new password 9"})
    assert response.status_code == 302 and response.headers["Location"] == "/"
    assert ("your other sessions were logged out"
            in client.get("/").get_data(as_text=True))
    assert laptop.get("/").headers["Location"].startswith("/auth/login")
    with app.app_context():
        assert LoginSession.query.count() == 1
    auth.logout()
    assert auth.login("alice_1", "password123").status_code == 200  # the old one is refused
    assert auth.login("alice_1", "new password 9").status_code == 302


@pytest.mark.parametrize("current, password, confirm, message", [
    ("wrongpass1", "new password 9", "new password 9", "The current password is not correct"),
    ("password123", "short", "short", "Password must be at least 8 characters long."),
    ("password123", "new password 9", "new password 8", "The two passwords do not match."),
])
def test_a_password_change_with_bad_input_is_refused_and_changes_nothing(
        app, client, auth, current, password, confirm, message):
    auth.register_and_login()
    with app.app_context():
        before = User.query.one().password_hash
    response = client.post("/auth/password", data={
        "current": current, "password": password, "confirm": confirm})
    assert response.status_code == 400
    assert message in response.get_data(as_text=True)
    with app.app_context():
        assert User.query.one().password_hash == before


def test_wrong_current_passwords_are_throttled_like_logins(app, client, auth):
    auth.register_and_login()
    for _ in range(5):
        client.post("/auth/password", data={"current": "wrongpass1", "password": "new password 9",
                                            "confirm": "new password 9"})
    response = client.post("/auth/password", data={
        "current": "password123", "password": "new password 9", "confirm": "new password 9"})
    assert response.status_code == 429
    assert "Too many failed logins" in response.get_data(as_text=True)


def test_the_header_links_to_the_change_password_page(client, auth):
    auth.register_and_login()
    assert 'href="/auth/password">Change password</a>' in client.get("/").get_data(as_text=True)
    page = client.get("/auth/password").get_data(as_text=True)
    assert 'name="current"' in page and 'name="confirm"' in page
    auth.logout()
    assert client.get("/auth/password").headers["Location"].startswith("/auth/login")


def test_a_login_session_older_than_the_session_lifetime_no_longer_works(app, client, auth):
    auth.register_and_login()
    with app.app_context():
        LoginSession.query.one().created_at = (
            utcnow() - app.permanent_session_lifetime - datetime.timedelta(minutes=1))
        db.session.commit()
    assert client.get("/").headers["Location"].startswith("/auth/login")
    AuthActions(app.test_client()).login()  # a new login deletes the expired row
    with app.app_context():
        assert LoginSession.query.count() == 1
