"""Users: create a user, log in (throttled), change the password, log out.

Logins are throttled per user name and per client address (``request.remote_addr``;
behind a reverse proxy the operator must apply werkzeug's ProxyFix, else every
client shares the proxy's address). After MAX_FAILURES failed logins in a row a
name or address is locked out for FIRST_LOCKOUT_S, twice as long after each
further failure, at most MAX_LOCKOUT_S; a locked login is answered at once with
HTTP 429. The counts live in the database, so a restart does not reset them.

Each login is a ``LoginSession`` row named in the Flask session: logout deletes
it, a password change deletes the user's others, and ``load_user`` accepts a
session cookie only while its row exists and is younger than Flask's
PERMANENT_SESSION_LIFETIME (31 days; older rows are deleted at the next login).
"""
import datetime
import math
import re
import secrets
from urllib.parse import urlsplit

from flask import (Blueprint, current_app, flash, redirect, render_template, request, session,
                   url_for)
from flask_login import LoginManager, current_user, login_user, logout_user
from sqlalchemy import delete, func, update
from sqlalchemy.exc import IntegrityError
from werkzeug.security import check_password_hash, generate_password_hash

from visualizer.models import LoginSession, LoginThrottle, User, db, utcnow

bp = Blueprint("auth", __name__, url_prefix="/auth")
login_manager = LoginManager()
# The key in the Flask session that names the user's LoginSession row.
LOGIN_SESSION_KEY = "login_session"

USERNAME_PATTERN = re.compile(r"[A-Za-z0-9_]{5,20}")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 128
MAX_FAILURES = 5
FIRST_LOCKOUT_S = 1
MAX_LOCKOUT_S = 15 * 60
# A name or address with no failed login for this long starts counting afresh.
FAILURE_MEMORY = datetime.timedelta(hours=1)
THROTTLE_KEY_LENGTH = 64  # LoginThrottle.key
# Checked when the user name is unknown, so that such a login costs one password hash
# of the same method (User.set_password's default) as a known name's.
DUMMY_PASSWORD_HASH = generate_password_hash(secrets.token_urlsafe(16))


def password_errors(password, confirm):
    """The reasons a password cannot be set (empty when it can)."""
    errors = []
    if len(password) < MIN_PASSWORD_LENGTH:
        errors.append("Password must be at least %d characters long." % MIN_PASSWORD_LENGTH)
    elif len(password) > MAX_PASSWORD_LENGTH:
        errors.append("Password must be at most %d characters long." % MAX_PASSWORD_LENGTH)
    if password != confirm:
        errors.append("The two passwords do not match.")
    return errors


def registration_errors(username, password, confirm):
    """The reasons a new user cannot be created with these values (empty when it can)."""
    errors = []
    if not USERNAME_PATTERN.fullmatch(username):
        errors.append("Username must be 5 to 20 characters long and contain only letters, "
                      "digits and underscores.")
    elif User.query.filter(func.lower(User.username) == username.lower()).first():
        errors.append("Username %s is already taken; choose another." % username)
    return errors + password_errors(password, confirm)


def safe_next_url(target):
    """``target`` if it is a path on this site (``/...``, no scheme or host), else None."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    return target


def password_matches(user, password):
    """Whether ``password`` is ``user``'s; an unknown user (None) costs as long as a known one."""
    if user is None:
        check_password_hash(DUMMY_PASSWORD_HASH, password)
        return False
    return user.check_password(password)


def lockout_s(failures):
    """Seconds a name or address is locked after its ``failures``-th failed login in a row."""
    if failures < MAX_FAILURES:
        return 0
    return min(FIRST_LOCKOUT_S * 2 ** min(failures - MAX_FAILURES, 20), MAX_LOCKOUT_S)


def throttle_keys(username):
    """The (scope, key) pairs a login attempt for ``username`` counts against."""
    return [("name", username.lower()[:THROTTLE_KEY_LENGTH]),
            ("address", (request.remote_addr or "unknown")[:THROTTLE_KEY_LENGTH])]


def locked_out(keys, now):
    """The (scope, seconds left) of the longest lock-out among ``keys``, or None."""
    longest = None
    for key in keys:
        row = db.session.get(LoginThrottle, key)
        if row is not None and row.locked_until is not None and row.locked_until > now:
            left = math.ceil((row.locked_until - now).total_seconds())
            if longest is None or left > longest[1]:
                longest = (key[0], left)
    return longest


def record_failure(keys, now):
    """Counts a failed login against every key, locking those that reach MAX_FAILURES.

    The count is raised in SQL (``failures + 1``), so logins failing at once in
    several threads are all counted.
    """
    try:
        _count_failure(keys, now)
    except IntegrityError:  # another thread inserted the same new key first
        db.session.rollback()
        _count_failure(keys, now)


def _count_failure(keys, now):
    db.session.execute(delete(LoginThrottle).where(
        LoginThrottle.last_failure_at < now - FAILURE_MEMORY))
    for scope, key in keys:
        counted = db.session.execute(
            update(LoginThrottle)
            .where(LoginThrottle.scope == scope, LoginThrottle.key == key)
            .values(failures=LoginThrottle.failures + 1, last_failure_at=now)).rowcount
        if not counted:
            db.session.add(LoginThrottle(scope=scope, key=key, failures=1, last_failure_at=now))
            db.session.flush()
        row = db.session.get(LoginThrottle, (scope, key), populate_existing=True)
        seconds = lockout_s(row.failures)
        if seconds:
            row.locked_until = now + datetime.timedelta(seconds=seconds)
    db.session.commit()


def clear_failures(username):
    db.session.execute(delete(LoginThrottle).where(
        LoginThrottle.scope == "name", LoginThrottle.key == throttle_keys(username)[0][1]))


def lockout_message(scope, seconds):
    who = "this user name" if scope == "name" else "your address"
    if seconds < 120:
        wait = "%d second%s" % (seconds, "" if seconds == 1 else "s")
    else:
        wait = "%d minutes" % math.ceil(seconds / 60)
    return ("Too many failed logins for %s. Try again in %s; each further failure "
            "doubles the wait." % (who, wait))


def locked_response(template, lock, **context):
    """The form again with HTTP 429, saying how long to wait."""
    scope, seconds = lock
    flash(lockout_message(scope, seconds), "error")
    return render_template(template, **context), 429, {"Retry-After": str(seconds)}


def start_login_session(user):
    """Logs ``user`` in with a fresh session id, recorded server-side."""
    session.clear()  # nothing of an earlier session carries over
    db.session.execute(delete(LoginSession).where(
        LoginSession.created_at < login_sessions_expired_before()))
    login_session = LoginSession(id=secrets.token_urlsafe(32), user_id=user.id)
    db.session.add(login_session)
    db.session.commit()
    session[LOGIN_SESSION_KEY] = login_session.id
    login_user(user)


@bp.route("/register", methods=("GET", "POST"))
def register():
    if current_user.is_authenticated:
        return redirect(url_for("scripts.index"))
    username = ""
    if request.method == "POST":
        username = request.form.get("username", "").strip()
        password = request.form.get("password", "")
        errors = registration_errors(username, password, request.form.get("confirm", ""))
        if not errors:
            user = User(username=username)
            user.set_password(password)
            db.session.add(user)
            db.session.commit()
            start_login_session(user)  # who just chose the password need not type it again
            flash("User %s created; you are logged in." % username, "success")
            return redirect(url_for("scripts.index"))
        for error in errors:
            flash(error, "error")
    return render_template("auth/register.html", username=username)


@bp.route("/login", methods=("GET", "POST"))
def login():
    next_url = safe_next_url(request.values.get("next"))
    if current_user.is_authenticated:
        return redirect(next_url or url_for("scripts.index"))
    username = ""
    if request.method == "POST":
        username = request.form.get("username", "").strip()
        keys = throttle_keys(username)
        lock = locked_out(keys, utcnow())
        if lock:
            return locked_response("auth/login.html", lock, username=username, next_url=next_url)
        user = User.query.filter_by(username=username).first()
        if password_matches(user, request.form.get("password", "")):
            clear_failures(username)
            start_login_session(user)
            return redirect(next_url or url_for("scripts.index"))
        record_failure(keys, utcnow())  # after the hash: a lock-out starts as this answer leaves
        flash("Incorrect username or password.", "error")
    return render_template("auth/login.html", username=username, next_url=next_url)


@bp.route("/password", methods=("GET", "POST"))
def change_password():
    if request.method == "POST":
        keys = throttle_keys(current_user.username)
        lock = locked_out(keys, utcnow())
        if lock:
            return locked_response("auth/password.html", lock)
        if not current_user.check_password(request.form.get("current", "")):
            record_failure(keys, utcnow())
            flash("The current password is not correct; the password was not changed.", "error")
            return render_template("auth/password.html"), 400
        password = request.form.get("password", "")
        errors = password_errors(password, request.form.get("confirm", ""))
        if errors:
            for error in errors:
                flash(error, "error")
            return render_template("auth/password.html"), 400
        current_user.set_password(password)
        db.session.execute(delete(LoginSession).where(
            LoginSession.user_id == current_user.id,
            LoginSession.id != session.get(LOGIN_SESSION_KEY)))
        db.session.commit()
        flash("Your password was changed; your other sessions were logged out.", "success")
        return redirect(url_for("scripts.index"))
    return render_template("auth/password.html")


@bp.route("/logout", methods=("POST",))
def logout():
    db.session.execute(delete(LoginSession).where(
        LoginSession.id == session.get(LOGIN_SESSION_KEY, "")))
    db.session.commit()
    logout_user()
    session.clear()  # nothing of this user's session (pending messages) is left to the next one
    flash("You are logged out.", "success")
    return redirect(url_for("auth.login"))


@login_manager.user_loader
def load_user(user_id):
    """The session's user while its login session exists server-side (logout deletes it)
    and is younger than PERMANENT_SESSION_LIFETIME."""
    login_session = db.session.get(LoginSession, session.get(LOGIN_SESSION_KEY) or "")
    if (login_session is None or str(login_session.user_id) != user_id
            or login_session.created_at < login_sessions_expired_before()):
        return None
    return db.session.get(User, login_session.user_id)


def login_sessions_expired_before():
    """Login sessions created before this time no longer log anyone in."""
    return utcnow() - current_app.permanent_session_lifetime


@login_manager.unauthorized_handler
def send_to_login():
    # A relative next (path and query only) so it is accepted as same-site after login.
    target = request.full_path if request.query_string else request.path
    if request.method == "GET":
        return redirect(url_for("auth.login", next=target))
    flash("Please log in first.", "error")
    return redirect(url_for("auth.login"))
