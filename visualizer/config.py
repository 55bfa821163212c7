"""Settings of the visualizer, read from environment variables with defaults.

=============================  ==========================================  =====================
environment variable           default                                     ``app.config`` key
=============================  ==========================================  =====================
VISUALIZER_HOST                127.0.0.1                                   HOST
VISUALIZER_PORT                5000                                        PORT
VISUALIZER_BOKEH_PORT          5006                                        BOKEH_PORT
VISUALIZER_BOKEH_URL           http://<HOST>:<BOKEH_PORT> (for browsers)   BOKEH_URL
VISUALIZER_STORAGE             <repo>/user_storage                         STORAGE_DIR
VISUALIZER_INSTANCE            <repo>/instance (database, secret key)      INSTANCE_DIR
VISUALIZER_DATABASE_URL        sqlite:///<INSTANCE_DIR>/visualizer.sqlite  SQLALCHEMY_DATABASE_URI
VISUALIZER_SECRET_KEY          generated once into <INSTANCE_DIR>/secret_key  SECRET_KEY
VISUALIZER_MAX_RUNS            2 (concurrent runs)                         MAX_CONCURRENT_RUNS
VISUALIZER_RUN_MEMORY_MB       none (memory limit of one run)              RUN_MEMORY_MB
VISUALIZER_RUN_WALL_TIME_S     none (wall-time limit of one run)           RUN_WALL_TIME_S
VISUALIZER_RUN_DISK_MB         2048 (disk use of one run folder)           RUN_DISK_MB
VISUALIZER_RUN_PROCESSES       1024 (processes and threads of one run)     RUN_PROCESSES
VISUALIZER_RUN_NETWORK         0 (1: runs may use the network)             RUN_NETWORK
VISUALIZER_SANDBOX             on (off: runs NOT sandboxed, unsafe)        SANDBOX
VISUALIZER_RUNNER              local (ray: every run is a Ray job)         RUNNER_KIND
VISUALIZER_RAY_ADDRESS         http://127.0.0.1:8265 (Ray's job API)       RAY_ADDRESS
VISUALIZER_RUN_CPUS            1 (CPUs one run asks Ray for)               RUN_CPUS
VISUALIZER_RUN_GPUS            none (GPUs one run asks Ray for)            RUN_GPUS
VISUALIZER_MAX_UPLOAD_MB       20                                          MAX_CONTENT_LENGTH (bytes)
VISUALIZER_HTTPS               0 (1: browsers reach the app over HTTPS)    HTTPS
VISUALIZER_USER_MAX_SCRIPTS    100 (files one user may keep)               USER_MAX_SCRIPTS
VISUALIZER_USER_STORAGE_MB     10240 (storage of one user, runs included)  USER_STORAGE_MB
VISUALIZER_EXPLORE_IDLE_S      600 (an exploration's job exits when idle)  EXPLORE_IDLE_S
VISUALIZER_EXPLORE_MODEL_MB    100 (largest .keras file to explore)        EXPLORE_MODEL_MB
VISUALIZER_DEMO_DIR            <INSTANCE_DIR>/demo (the demo model+images)  DEMO_DIR
=============================  ==========================================  =====================
"""
import os
import secrets

from custom_keras import storage
from visualizer.runner import DEFAULT_DISK_MB, DEFAULT_PROCESSES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET_KEY_FILE = "secret_key"
DATABASE_FILE = "visualizer.sqlite"
DEFAULT_RAY_ADDRESS = "http://127.0.0.1:8265"


def settings_from_env(environ=None):
    """The settings given by environment variables, with defaults.

    Settings that depend on others (BOKEH_URL, SQLALCHEMY_DATABASE_URI,
    SECRET_KEY, DEMO_DIR) are None unless set; ``complete_settings`` fills them in once
    overrides (such as a test configuration) are applied.

    Args:
        environ: mapping of environment variables; ``os.environ`` when None.

    Returns:
        dict of ``app.config`` keys.

    Raises:
        ValueError: a numeric variable does not hold a positive number, or a
            flag is not 0 or 1; the message names the variable.
    """
    env = os.environ if environ is None else environ
    upload_mb = _number(env, "VISUALIZER_MAX_UPLOAD_MB", 20)
    return {
        "HOST": env.get("VISUALIZER_HOST", "127.0.0.1"),
        "PORT": _number(env, "VISUALIZER_PORT", 5000),
        "BOKEH_PORT": _number(env, "VISUALIZER_BOKEH_PORT", 5006),
        "BOKEH_URL": env.get("VISUALIZER_BOKEH_URL"),
        "STORAGE_DIR": storage.storage_dir_from_env(env),
        "INSTANCE_DIR": os.path.abspath(env.get("VISUALIZER_INSTANCE",
                                                os.path.join(REPO_ROOT, "instance"))),
        "SQLALCHEMY_DATABASE_URI": env.get("VISUALIZER_DATABASE_URL"),
        "SECRET_KEY": env.get("VISUALIZER_SECRET_KEY"),
        "MAX_CONCURRENT_RUNS": _number(env, "VISUALIZER_MAX_RUNS", 2),
        "RUN_MEMORY_MB": _number(env, "VISUALIZER_RUN_MEMORY_MB", None),
        "RUN_WALL_TIME_S": _number(env, "VISUALIZER_RUN_WALL_TIME_S", None),
        "RUN_DISK_MB": _number(env, "VISUALIZER_RUN_DISK_MB", DEFAULT_DISK_MB),
        "RUN_PROCESSES": _number(env, "VISUALIZER_RUN_PROCESSES", DEFAULT_PROCESSES),
        "RUN_NETWORK": _choice(env, "VISUALIZER_RUN_NETWORK", {"0": False, "1": True}, "0"),
        "SANDBOX": _choice(env, "VISUALIZER_SANDBOX", {"on": "on", "off": "off"}, "on"),
        "RUNNER_KIND": _choice(env, "VISUALIZER_RUNNER", {"local": "local", "ray": "ray"},
                               "local"),
        "RAY_ADDRESS": env.get("VISUALIZER_RAY_ADDRESS", "").strip() or DEFAULT_RAY_ADDRESS,
        "RUN_CPUS": _number(env, "VISUALIZER_RUN_CPUS", 1),
        "RUN_GPUS": _number(env, "VISUALIZER_RUN_GPUS", None),
        "MAX_CONTENT_LENGTH": int(upload_mb * 1024 * 1024),
        "HTTPS": _choice(env, "VISUALIZER_HTTPS", {"0": False, "1": True}, "0"),
        "USER_MAX_SCRIPTS": _number(env, "VISUALIZER_USER_MAX_SCRIPTS", 100),
        "USER_STORAGE_MB": _number(env, "VISUALIZER_USER_STORAGE_MB", 10240),
        "EXPLORE_IDLE_S": _number(env, "VISUALIZER_EXPLORE_IDLE_S", 600),
        "EXPLORE_MODEL_MB": _number(env, "VISUALIZER_EXPLORE_MODEL_MB", 100),
        "DEMO_DIR": env.get("VISUALIZER_DEMO_DIR"),
    }


def complete_settings(settings):
    """Fill in the settings that derive from others, creating the instance folder.

    Args:
        settings: dict from ``settings_from_env``, possibly with overrides.

    Returns:
        the same dict, with BOKEH_URL, SQLALCHEMY_DATABASE_URI, SECRET_KEY and DEMO_DIR set.
    """
    os.makedirs(settings["INSTANCE_DIR"], exist_ok=True)
    settings["DEMO_DIR"] = demo_dir(settings)
    if not settings.get("BOKEH_URL"):
        settings["BOKEH_URL"] = "http://%s:%d" % (settings["HOST"], settings["BOKEH_PORT"])
    if not settings.get("SQLALCHEMY_DATABASE_URI"):
        settings["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + os.path.join(
            settings["INSTANCE_DIR"], DATABASE_FILE)
    if not settings.get("SECRET_KEY"):
        settings["SECRET_KEY"] = load_or_create_secret_key(settings["INSTANCE_DIR"])
    return settings


def demo_dir(settings):
    """The folder of the demo model and images (trained by scripts/setup.sh): DEMO_DIR, else
    ``<INSTANCE_DIR>/demo``."""
    return os.path.abspath(settings.get("DEMO_DIR") or os.path.join(settings["INSTANCE_DIR"], "demo"))


def load_or_create_secret_key(instance_dir):
    """The installation's secret key, generated on first use into ``<instance_dir>/secret_key``.

    The file is created with 0600 rights (owner only) and never overwritten.
    """
    path = os.path.join(instance_dir, SECRET_KEY_FILE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        key = secrets.token_urlsafe(48)
        f.write(key)
    return key


def _number(env, name, default):
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("%s must be a number, got %r" % (name, raw)) from None
    if value <= 0:
        raise ValueError("%s must be positive, got %r" % (name, raw))
    return int(value) if value.is_integer() else value


def _choice(env, name, values, default):
    raw = env.get(name, "").strip() or default
    if raw not in values:
        raise ValueError("%s must be %s, got %r" % (name, " or ".join(values), raw))
    return values[raw]
