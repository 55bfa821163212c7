"""Creating users, logging in and out, and the login redirect with a safe `next`."""
import pytest

from visualizer.auth import safe_next_url
from visualizer.models import User


def user_count(app):
    with app.app_context():
        return User.query.count()


def test_register_creates_user_with_salted_hash(app, client, auth):
    response = auth.register("alice_1", "password123")
    assert response.status_code == 302 and response.headers["Location"] == "/auth/login"
    auth.register("bob_22", "password123")
    with app.app_context():
        alice = User.query.filter_by(username="alice_1").one()
        bob = User.query.filter_by(username="bob_22").one()
        assert alice.password_hash != "password123"
        assert alice.password_hash != bob.password_hash  # salted
        assert alice.check_password("password123") and not alice.check_password("password124")


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
