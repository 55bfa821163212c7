"""Database models: users, their login sessions, scripts, tags, runs, explorations and filter
marks (Flask-SQLAlchemy).

A change here needs a migration in ``visualizer/migrations/versions`` (see
``visualizer/migrations/README``): the start path upgrades existing databases with it.
"""
import datetime

from flask_login import UserMixin
from werkzeug.security import check_password_hash, generate_password_hash

from flask_sqlalchemy import SQLAlchemy

from custom_keras import storage

db = SQLAlchemy()

ACTIVE_STATES = storage.RUN_ACTIVE_STATES
FAILED = storage.RUN_FAILED
ENDED_STATES = storage.RUN_ENDED_STATES
SHORT_HASH_DIGITS = 10


def utcnow():
    """Naive UTC now: the database stores UTC times without a zone."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def utc_from_timestamp(seconds):
    """Naive UTC time from a Unix timestamp (as the runner reports them), or None."""
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).replace(tzinfo=None)


script_tags = db.Table(
    "script_tags",
    db.Column("script_id", db.Integer, db.ForeignKey("script.id"), primary_key=True),
    db.Column("tag_id", db.Integer, db.ForeignKey("tag.id"), primary_key=True),
)


class User(UserMixin, db.Model):
    id = db.Column(db.Integer, primary_key=True)
    username = db.Column(db.String(20), unique=True, nullable=False)
    password_hash = db.Column(db.String(256), nullable=False)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    scripts = db.relationship("Script", back_populates="user", cascade="all, delete-orphan")

    def set_password(self, password):
        self.password_hash = generate_password_hash(password)

    def check_password(self, password):
        return check_password_hash(self.password_hash, password)


class LoginSession(db.Model):
    """One login of a user, named by a random id kept in that browser's Flask session.

    A signed cookie alone cannot be taken back; this row can: logout deletes it,
    a password change deletes the user's others, and a cookie whose row is gone
    no longer logs anyone in.
    """
    id = db.Column(db.String(64), primary_key=True)
    user_id = db.Column(db.Integer, db.ForeignKey("user.id"), nullable=False, index=True)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)


class LoginThrottle(db.Model):
    """Failed logins counted for one user name or one client address.

    ``scope`` is ``"name"`` or ``"address"``; ``locked_until`` is set once
    ``failures`` reaches the threshold in ``visualizer.auth``.
    """
    scope = db.Column(db.String(10), primary_key=True)
    key = db.Column(db.String(64), primary_key=True)
    failures = db.Column(db.Integer, nullable=False, default=0)
    last_failure_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    locked_until = db.Column(db.DateTime)


class Tag(db.Model):
    """A tag name of one user: two users' tags of the same name are different rows."""
    __table_args__ = (db.UniqueConstraint("user_id", "name"),)
    id = db.Column(db.Integer, primary_key=True)
    user_id = db.Column(db.Integer, db.ForeignKey("user.id"), nullable=False, index=True)
    name = db.Column(db.String(40), nullable=False)


class HasRuns:
    """A script or an exploration: something whose ``runs`` (oldest first) the runner runs."""

    @property
    def last_run(self):
        return self.runs[-1] if self.runs else None

    @property
    def is_active(self):
        return self.last_run is not None and self.last_run.state in ACTIVE_STATES


class Script(HasRuns, db.Model):
    """An uploaded training script; its folder is ``<STORAGE_DIR>/<user_id>/<stem>`` and each
    of its runs has one below it (``visualizer.run_store.run_folder``)."""
    __table_args__ = (db.UniqueConstraint("user_id", "filename"),)
    id = db.Column(db.Integer, primary_key=True)
    user_id = db.Column(db.Integer, db.ForeignKey("user.id"), nullable=False, index=True)
    filename = db.Column(db.String(255), nullable=False)
    uploaded_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    # When the user last looked at one of the script's pages: runs that ended
    # later are announced in the banner.
    seen_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    user = db.relationship("User", back_populates="scripts")
    tags = db.relationship("Tag", secondary=script_tags, order_by="Tag.name")
    runs = db.relationship("Run", back_populates="script", order_by="Run.id",
                           cascade="all, delete-orphan")

    @property
    def stem(self):
        return storage.script_stem(self.filename)

    @property
    def rel_dir(self):
        """The script's folder relative to STORAGE_DIR, e.g. ``"3/mnist_digits"``."""
        return storage.script_rel_dir(self.user_id, self.filename)


class Run(db.Model):
    """One run of a script, kept with its own folder (``visualizer.run_store.run_folder``).

    ``number`` counts the script's runs from 1; ``script_sha256`` is the hash of the
    script copy the run started with; ``images`` the names of the visualization images
    it used; ``final_metrics`` ({metric: value}) and ``alert_count`` are read from its
    folder when it ends, so the run list needs no file.
    """
    id = db.Column(db.Integer, primary_key=True)
    # A run is of a script or of an exploration (its analysis job): exactly one is set.
    script_id = db.Column(db.Integer, db.ForeignKey("script.id"), index=True)
    exploration_id = db.Column(db.Integer, db.ForeignKey("exploration.id"), index=True)
    state = db.Column(db.String(10), nullable=False, default=storage.RUN_QUEUED)
    exit_code = db.Column(db.Integer)
    pid = db.Column(db.Integer)
    message = db.Column(db.Text)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    started_at = db.Column(db.DateTime)
    ended_at = db.Column(db.DateTime)
    number = db.Column(db.Integer)
    script_sha256 = db.Column(db.String(64))
    images = db.Column(db.JSON)
    final_metrics = db.Column(db.JSON)
    alert_count = db.Column(db.Integer)
    script = db.relationship("Script", back_populates="runs")
    exploration = db.relationship("Exploration", back_populates="runs")

    @property
    def is_active(self):
        return self.state in ACTIVE_STATES

    @property
    def last_change(self):
        return self.ended_at or self.started_at or self.created_at

    @property
    def duration(self):
        """The run's time from start to end (to now while it runs) as a timedelta, or None."""
        if self.started_at is None:
            return None
        return (self.ended_at or utcnow()) - self.started_at

    @property
    def short_hash(self):
        """The first hex digits of ``script_sha256`` that people compare, or ""."""
        return (self.script_sha256 or "")[:SHORT_HASH_DIGITS]

EXPLORATION_SOURCES = ("upload", "run", "demo")


class Exploration(HasRuns, db.Model):
    """A trained model and inputs that a job analyses (``custom_keras.explore``).

    Its folder is ``<STORAGE_DIR>/<user_id>/explore@<id>`` (``storage.exploration_rel_dir``).
    ``class_names`` and ``notices`` are JSON text: a list of str, or None for no class names.
    """
    id = db.Column(db.Integer, primary_key=True)
    user_id = db.Column(db.Integer, db.ForeignKey("user.id"), nullable=False, index=True)
    name = db.Column(db.String(255), nullable=False)
    source = db.Column(db.String(10), nullable=False)
    model_sha256 = db.Column(db.String(64), nullable=False)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    class_names = db.Column(db.Text)
    notices = db.Column(db.Text, nullable=False, default="[]")
    runs = db.relationship("Run", back_populates="exploration", order_by="Run.id",
                           cascade="all, delete-orphan")

    @property
    def rel_dir(self):
        return storage.exploration_rel_dir(self.user_id, self.id)


FILTER_MARKS = ("good", "bad")


class FilterMark(db.Model):
    """A user's mark on one filter of one layer of a model (named by the model file's sha256),
    so the marks follow the model into every exploration of it."""
    __table_args__ = (db.UniqueConstraint("user_id", "model_sha256", "node", "filter_index"),)
    id = db.Column(db.Integer, primary_key=True)
    user_id = db.Column(db.Integer, db.ForeignKey("user.id"), nullable=False, index=True)
    model_sha256 = db.Column(db.String(64), nullable=False)
    node = db.Column(db.String(255), nullable=False)
    filter_index = db.Column(db.Integer, nullable=False)
    mark = db.Column(db.String(4), nullable=False)
