"""Users: create a user, log in, log out."""
import re
from urllib.parse import urlsplit

from flask import Blueprint, flash, redirect, render_template, request, session, url_for
from flask_login import current_user, login_user, logout_user
from sqlalchemy import func

from visualizer.models import User, db

bp = Blueprint("auth", __name__, url_prefix="/auth")

USERNAME_PATTERN = re.compile(r"[A-Za-z0-9_]{5,20}")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 128


def registration_errors(username, password, confirm):
    """The reasons a new user cannot be created with these values (empty when it can)."""
    errors = []
    if not USERNAME_PATTERN.fullmatch(username):
        errors.append("Username must be 5 to 20 characters long and contain only letters, "
                      "digits and underscores.")
    elif User.query.filter(func.lower(User.username) == username.lower()).first():
        errors.append("Username %s is already taken; choose another." % username)
    if len(password) < MIN_PASSWORD_LENGTH:
        errors.append("Password must be at least %d characters long." % MIN_PASSWORD_LENGTH)
    elif len(password) > MAX_PASSWORD_LENGTH:
        errors.append("Password must be at most %d characters long." % MAX_PASSWORD_LENGTH)
    if password != confirm:
        errors.append("The two passwords do not match.")
    return errors


def safe_next_url(target):
    """``target`` if it is a path on this site (``/...``, no scheme or host), else None."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    return target


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
            flash("User %s created. Log in to start." % username, "success")
            return redirect(url_for("auth.login"))
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
        user = User.query.filter_by(username=username).first()
        if user is not None and user.check_password(request.form.get("password", "")):
            login_user(user)
            return redirect(next_url or url_for("scripts.index"))
        flash("Incorrect username or password.", "error")
    return render_template("auth/login.html", username=username, next_url=next_url)


@bp.route("/logout", methods=("POST",))
def logout():
    logout_user()
    session.clear()  # nothing of this user's session (pending messages) is left to the next one
    flash("You are logged out.", "success")
    return redirect(url_for("auth.login"))
