"""The Flask application of the training visualizer: users, scripts, runs and pages."""
import datetime
import os
import sys

from flask import Flask, flash, redirect, render_template, request, url_for
from flask_login import LoginManager, current_user
from flask_wtf.csrf import CSRFError, CSRFProtect

from custom_keras import registry
from visualizer import config
from visualizer.models import ACTIVE_STATES, Run, User, db, utc_from_timestamp

# Pages an anonymous visitor may open; every other page sends them to the login page.
PUBLIC_ENDPOINTS = {"auth.login", "auth.register", "static", "favicon"}

login_manager = LoginManager()
csrf = CSRFProtect()


def create_app(test_config=None):
    """Create the Flask app, its database tables and its runner.

    Args:
        test_config: optional dict of ``app.config`` overrides applied after the
            environment settings. ``RUNNER`` in it injects a runner object (with
            ``start``, ``stop`` and ``reconcile``) instead of building a
            ``LocalRunner``, so tests spawn processes only when they mean to.

    Returns:
        the Flask app; the runner is ``app.extensions["runner"]``.
    """
    app = Flask(__name__)
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SAMESITE="Lax",
        WTF_CSRF_TIME_LIMIT=None,  # a token lives as long as the session
    )
    settings = config.settings_from_env()
    settings.update(test_config or {})
    app.config.update(config.complete_settings(settings))
    os.makedirs(app.config["STORAGE_DIR"], exist_ok=True)

    db.init_app(app)
    csrf.init_app(app)
    login_manager.init_app(app)
    login_manager.login_view = "auth.login"

    from visualizer import auth, runs, scripts
    app.register_blueprint(auth.bp)
    app.register_blueprint(scripts.bp)
    app.register_blueprint(runs.bp)
    app.jinja_env.filters["localtime"] = format_local_time
    # Browsers ask for /favicon.ico on their own (e.g. for a JSON page or a download).
    app.add_url_rule("/favicon.ico", "favicon", lambda: app.send_static_file("favicon.ico"))
    _register_handlers(app)

    with app.app_context():
        db.create_all()
    _start_runner(app)
    return app


def _start_runner(app):
    """Build (or take the injected) runner, start its monitor, and reconcile the database."""
    runner = app.config.get("RUNNER")
    if runner is None:
        from visualizer.runner import LocalRunner
        from visualizer.sandbox import Cgroups
        sandbox, refusal = _sandbox(app)
        runner = LocalRunner(max_concurrent=app.config["MAX_CONCURRENT_RUNS"],
                             memory_limit_mb=app.config["RUN_MEMORY_MB"],
                             wall_time_s=app.config["RUN_WALL_TIME_S"],
                             on_update=lambda update: apply_run_update(app, update),
                             sandbox=sandbox, cgroups=Cgroups.detect(app.config["STORAGE_DIR"]),
                             disk_limit_mb=app.config["RUN_DISK_MB"],
                             max_processes=app.config["RUN_PROCESSES"], refusal=refusal)
        runner.start_monitor()
    app.extensions["runner"] = runner
    with app.app_context():
        open_runs = Run.query.filter(Run.state.in_(ACTIVE_STATES)).order_by(Run.id).all()
        records = [(run.id, run.state, run.pid, run_dir(app, run.script),
                    script_path(app, run.script)) for run in open_runs]
    for update in runner.reconcile(records) if records else []:
        apply_run_update(app, update)


def _sandbox(app):
    """(the runs' Sandbox or None, why runs are refused or None), said at start.

    A trivial sandbox is started now, so a machine without bubblewrap or without
    namespaces is found out before anyone presses Run.
    """
    from visualizer.sandbox import OFF_MESSAGE, Sandbox, SandboxUnavailable
    if app.config["SANDBOX"] == "off":
        print("WARNING: " + OFF_MESSAGE, file=sys.stderr, flush=True)
        return None, None
    sandbox = Sandbox(app.config["STORAGE_DIR"], network=app.config["RUN_NETWORK"])
    try:
        sandbox.check()
    except SandboxUnavailable as error:
        refusal = ("the sandbox that every run needs is not available on this server (%s), so "
                   "no script is run. The operator can install bubblewrap, or set "
                   "VISUALIZER_SANDBOX=off to run scripts without it (unsafe)" % error)
        print("WARNING: " + refusal, file=sys.stderr, flush=True)
        return None, refusal
    return sandbox, None


def apply_run_update(app, update):
    """Write a runner's state change (a ``RunUpdate``) into the database.

    Called from the runner's monitor thread, hence the app context of its own.
    """
    with app.app_context():
        run = db.session.get(Run, update.run_id)
        if run is None:
            return
        run.state = update.state
        run.exit_code = update.exit_code
        run.pid = update.pid
        run.message = update.message
        if update.started_at is not None:
            run.started_at = utc_from_timestamp(update.started_at)
        if update.ended_at is not None:
            run.ended_at = utc_from_timestamp(update.ended_at)
        db.session.commit()


def run_dir(app, script):
    """The run folder of a script: ``<STORAGE_DIR>/<user_id>/<stem>``."""
    return os.path.join(app.config["STORAGE_DIR"], str(script.user_id), script.stem)


def script_path(app, script):
    return os.path.join(run_dir(app, script), script.filename)


def format_local_time(value, with_date=True):
    """A naive UTC time from the database, shown in the server's local time."""
    if value is None:
        return ""
    local = value.replace(tzinfo=datetime.timezone.utc).astimezone()
    return local.strftime("%Y-%m-%d %H:%M" if with_date else "%H:%M:%S")


@login_manager.user_loader
def load_user(user_id):
    return db.session.get(User, int(user_id))


@login_manager.unauthorized_handler
def send_to_login():
    # A relative next (path and query only) so it is accepted as same-site after login.
    target = request.full_path if request.query_string else request.path
    if request.method == "GET":
        return redirect(url_for("auth.login", next=target))
    flash("Please log in first.", "error")
    return redirect(url_for("auth.login"))


def _register_handlers(app):
    @app.before_request
    def require_login():
        if request.endpoint in PUBLIC_ENDPOINTS or current_user.is_authenticated:
            return None
        return login_manager.unauthorized()

    @app.context_processor
    def technique_tabs():
        return {"techniques": registry.TECHNIQUES}

    @app.context_processor
    def sandbox_banner():
        from visualizer.sandbox import OFF_MESSAGE
        return {"sandbox_off_message": OFF_MESSAGE}

    @app.context_processor
    def run_banner():
        if not current_user.is_authenticated:
            return {}
        from visualizer.scripts import unseen_ended_runs
        return {"ended_runs": unseen_ended_runs(current_user)}

    @app.errorhandler(404)
    def not_found(error):
        return render_template("error.html", title="Not found",
                               message="There is no such page, or it belongs to another user."), 404

    @app.errorhandler(413)
    def too_large(error):
        limit_mb = app.config["MAX_CONTENT_LENGTH"] / (1024 * 1024)
        return render_template(
            "error.html", title="Upload too large",
            message="The upload is larger than the limit of %g MB; nothing was saved. "
                    "Choose a smaller file." % limit_mb), 413

    @app.errorhandler(CSRFError)
    def csrf_failed(error):
        return render_template(
            "error.html", title="Form expired",
            message="The form was missing its security token or the token was invalid (%s); "
                    "nothing was saved. Go back, reload the page and try again."
                    % error.description), 400
