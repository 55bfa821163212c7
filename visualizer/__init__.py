"""The Flask application of the training visualizer: users, scripts, runs and pages."""
import datetime
import os
import secrets
import sys
from urllib.parse import urlsplit

import sqlalchemy
from alembic import command
from flask import Flask, g, render_template, request
from flask_login import current_user
from flask_migrate import Migrate
from flask_wtf.csrf import CSRFError, CSRFProtect
from markupsafe import Markup

from custom_keras import registry
from visualizer import auth, config, explore, runs, scripts
from visualizer.models import ACTIVE_STATES, Run, db
from visualizer.run_store import apply_run_update, run_folder, run_script_path

# Pages an anonymous visitor may open; every other page sends them to the login page.
PUBLIC_ENDPOINTS = {"auth.login", "auth.register", "static", "favicon"}
MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
# The revision whose schema equals the tables create_all made before migrations existed.
BASELINE_REVISION = "0001"
HSTS_MAX_AGE_S = 365 * 24 * 3600

csrf = CSRFProtect()
migrate = Migrate(directory=MIGRATIONS_DIR)


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
    # Behind TLS the cookies must never travel in clear text.
    app.config.update(SESSION_COOKIE_SECURE=app.config["HTTPS"],
                      REMEMBER_COOKIE_SECURE=app.config["HTTPS"])
    os.makedirs(app.config["STORAGE_DIR"], exist_ok=True)

    db.init_app(app)
    migrate.init_app(app, db)
    # before the CSRF check, which reads the form: a model upload's own body limit
    app.before_request(explore.allow_model_upload)
    csrf.init_app(app)
    auth.login_manager.init_app(app)
    auth.login_manager.login_view = "auth.login"

    app.register_blueprint(auth.bp)
    app.register_blueprint(scripts.bp)
    app.register_blueprint(runs.bp)
    app.register_blueprint(explore.bp)
    app.jinja_env.filters["localtime"] = format_local_time
    app.jinja_env.filters["with_csp_nonce"] = with_csp_nonce
    # Browsers ask for /favicon.ico on their own (e.g. for a JSON page or a download).
    app.add_url_rule("/favicon.ico", "favicon", lambda: app.send_static_file("favicon.ico"))
    _register_handlers(app)

    with app.app_context():
        migrate_database(app)
    _start_runner(app)
    return app


def migrate_database(app):
    """Brings the database to the newest schema, keeping its data (Alembic via Flask-Migrate).

    A database without tables gets the models' tables and is stamped as the
    newest revision; one made before migrations existed (tables but no
    ``alembic_version``) is stamped as ``BASELINE_REVISION`` and upgraded; any
    other is upgraded. Call it in the app context.
    """
    alembic_config = app.extensions["migrate"].migrate.get_config()
    tables = set(sqlalchemy.inspect(db.engine).get_table_names())
    if not tables:
        db.create_all()
        command.stamp(alembic_config, "head")
        return
    if "alembic_version" not in tables:
        command.stamp(alembic_config, BASELINE_REVISION)
    command.upgrade(alembic_config, "head")


def _start_runner(app):
    """Build (or take the injected) runner, start its monitor, and reconcile the database."""
    runner = app.config.get("RUNNER")
    if runner is None:
        sandbox, refusal = _sandbox(app)
        common = dict(memory_limit_mb=app.config["RUN_MEMORY_MB"],
                      wall_time_s=app.config["RUN_WALL_TIME_S"],
                      on_update=lambda update: apply_run_update(app, update),
                      sandbox=sandbox, disk_limit_mb=app.config["RUN_DISK_MB"],
                      max_processes=app.config["RUN_PROCESSES"], refusal=refusal)
        if app.config["RUNNER_KIND"] == "ray":
            # Imported only here: Ray is installed only where it is used (requirements-ray.txt).
            from visualizer.ray_runner import RayRunner
            runner = RayRunner(app.config["RAY_ADDRESS"], app.config["STORAGE_DIR"],
                               num_cpus=app.config["RUN_CPUS"], num_gpus=app.config["RUN_GPUS"],
                               **common)
        else:
            from visualizer.runner import LocalRunner
            from visualizer.sandbox import Cgroups
            runner = LocalRunner(max_concurrent=app.config["MAX_CONCURRENT_RUNS"],
                                 cgroups=Cgroups.detect(app.config["STORAGE_DIR"]), **common)
        runner.start_monitor()
    app.extensions["runner"] = runner
    with app.app_context():
        open_runs = Run.query.filter(Run.state.in_(ACTIVE_STATES)).order_by(Run.id).all()
        records = [(run.id, run.state, run.pid, run_folder(app, run), run_script_path(app, run))
                   for run in open_runs]
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


def format_local_time(value, with_date=True):
    """A naive UTC time from the database, shown in the server's local time."""
    if value is None:
        return ""
    local = value.replace(tzinfo=datetime.timezone.utc).astimezone()
    return local.strftime("%Y-%m-%d %H:%M" if with_date else "%H:%M:%S")


def csp_nonce():
    """This response's random nonce, which inline scripts need to run (see security_headers)."""
    if "csp_nonce" not in g:
        g.csp_nonce = secrets.token_urlsafe(18)
    return g.csp_nonce


def with_csp_nonce(html):
    """Trusted HTML (e.g. Bokeh's embed script) with this response's nonce on its <script> tags."""
    return Markup(str(html).replace("<script", '<script nonce="%s"' % csp_nonce()))


def content_security_policy(bokeh_url, nonce):
    """The Content-Security-Policy of every response.

    Scripts: ours, inline ones carrying the nonce, and the Bokeh server's. Bokeh's
    embed script fetches autoload.js and runs it as a ``blob:`` script, and
    BokehJS opens a websocket to its server. BokehJS sets inline styles on the
    elements it draws (Chromium blocks about a hundred of them and the layout
    breaks under ``style-src 'self'``), so styles, unlike scripts, allow inline;
    its toolbar icons are ``data:`` SVG images. Each of these was found needed
    in Chromium (tests/e2e/test_requests.py); no ``'unsafe-eval'`` is.
    """
    parts = urlsplit(bokeh_url)
    bokeh_origin = "%s://%s" % (parts.scheme, parts.netloc)
    bokeh_socket = "%s://%s" % ("wss" if parts.scheme == "https" else "ws", parts.netloc)
    return "; ".join([
        "default-src 'self'",
        "script-src 'self' 'nonce-%s' %s blob:" % (nonce, bokeh_origin),
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "connect-src 'self' %s %s" % (bokeh_origin, bokeh_socket),
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ])


def _register_handlers(app):
    @app.after_request
    def security_headers(response):
        headers = response.headers
        headers["Content-Security-Policy"] = content_security_policy(app.config["BOKEH_URL"],
                                                                      csp_nonce())
        headers["X-Frame-Options"] = "DENY"
        headers["X-Content-Type-Options"] = "nosniff"
        headers["Referrer-Policy"] = "same-origin"
        if app.config["HTTPS"]:
            headers["Strict-Transport-Security"] = "max-age=%d" % HSTS_MAX_AGE_S
        return response

    @app.before_request
    def require_login():
        if request.endpoint in PUBLIC_ENDPOINTS or current_user.is_authenticated:
            return None
        return auth.login_manager.unauthorized()

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
        return {"ended_runs": scripts.unseen_ended_runs(current_user)}

    @app.errorhandler(404)
    def not_found(error):
        return render_template("error.html", title="Not found",
                               message="There is no such page, or it belongs to another user."), 404

    @app.errorhandler(413)
    def too_large(error):
        # this request's limit: a new exploration's is larger (explore.allow_model_upload)
        limit_mb = (request.max_content_length or app.config["MAX_CONTENT_LENGTH"]) / (1024 * 1024)
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
