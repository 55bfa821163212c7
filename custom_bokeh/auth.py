"""Signed, short-lived session tokens that bind a Bokeh session to one user's run.

The Flask app calls ``embed_script``: it mints a JWT (Bokeh's own token format,
signed with the installation's secret key) whose payload carries the user id,
the run folder relative to the storage folder and the technique, and uses the
whole token as the Bokeh session id. The Bokeh server runs with
``sign_sessions=True`` and ``generate_session_ids=False``, so it refuses (403)
any session id that the secret key did not sign; ``verify_token`` then checks
the payload (expiry, run belongs to the user, run inside the storage folder and
reached without links, the app is the technique the token was minted for). No
user or file name travels as a plain query argument. A comparison token
(``embed_compare_script``) carries 2 to 4 run folders of one user instead of
one, each checked the same way, and opens only the comparison app it was minted
for. This module imports no keras.
"""
import calendar
import datetime
import os
from dataclasses import dataclass

from bokeh.embed import server_session
from bokeh.util.token import (check_token_signature, generate_jwt_token, generate_session_id,
                              get_token_payload)

from custom_keras import storage


class InvalidToken(ValueError):
    """A session token that is unsigned, forged, expired or names a run it may not open."""


def make_token(secret_key, user_id, run_rel_dir, technique_key, expiration_s=300):
    """A signed token for one technique of one user's run, valid for ``expiration_s`` seconds.

    Args:
        secret_key: the installation's secret key (str or bytes).
        user_id: the id of the logged-in user who owns the run.
        run_rel_dir: the run folder relative to the storage folder, e.g. ``"3/mnist_digits"``.
        technique_key: the registry key of the one technique (Bokeh app) the token opens.
        expiration_s: seconds within which the session must be opened; an open
            session keeps working after that.
    """
    if not secret_key:
        raise ValueError("secret_key must be a non-empty string")
    if not technique_key or not isinstance(technique_key, str):
        raise ValueError("technique_key must be a technique's key, got %r" % (technique_key,))
    storage.check_run_rel_dir(user_id, run_rel_dir)
    session_id = generate_session_id(secret_key=_as_bytes(secret_key), signed=True)
    return generate_jwt_token(session_id, secret_key=_as_bytes(secret_key), signed=True,
                              extra_payload={"user_id": user_id, "run": run_rel_dir,
                                             "technique": technique_key},
                              expiration=int(expiration_s))


def embed_script(bokeh_url, secret_key, technique_key, user_id, run_rel_dir, expiration_s=300):
    """The ``<script>`` HTML that embeds one technique's dashboard for one user's run.

    Args:
        bokeh_url: the Bokeh server address as the browser reaches it, e.g. ``"http://127.0.0.1:5006"``.
        secret_key: the installation's secret key, the same the Bokeh server was started with.
        technique_key: the registry key of the technique, i.e. the Bokeh app path.
        user_id: the id of the logged-in user who owns the run.
        run_rel_dir: the run folder relative to the storage folder, e.g. ``"3/mnist_digits"``.
        expiration_s: seconds within which the page must open the session.
    """
    token = make_token(secret_key, user_id, run_rel_dir, technique_key, expiration_s)
    return server_session(session_id=token, url="%s/%s" % (bokeh_url.rstrip("/"), technique_key))


def verify_token(token, secret_key, storage_dir, technique_key):
    """The run folder a token grants to one technique's app, or ``InvalidToken`` saying why not.

    Args:
        token: the session id the page opened the session with.
        secret_key: the secret key the server signs with.
        storage_dir: the folder that holds every user's runs.
        technique_key: the technique of the app being opened; the token must be
            minted for it.
    """
    payload = _signed_payload(token, secret_key)
    if payload.get("technique") != technique_key or "compare" in payload:
        raise InvalidToken("the session token was made for another dashboard")
    return _granted_run_dir(storage_dir, payload.get("user_id"), payload.get("run"))


# The comparison apps of the Bokeh server and how many runs one comparison shows.
COMPARE_CURVES_APP = "compare_training_progress"
COMPARE_IMAGES_APP = "compare_images"
MIN_COMPARED_RUNS, MAX_COMPARED_RUNS = 2, 4
MAX_RUN_LABEL = 200  # characters of a run's label carried in a comparison token
# One colour per compared run in the page's order (Bokeh's Category10): the apps draw each run
# in its colour and the page's table names the runs in the same.
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")


@dataclass(frozen=True)
class CompareGrant:
    """What a comparison token grants: run folders in the page's order, their labels, and the
    snapshot technique the images app shows (None for the curves app)."""
    run_dirs: tuple
    labels: tuple
    technique_key: str = None


def make_compare_token(secret_key, user_id, runs, app_key, technique_key=None, expiration_s=300):
    """A signed token for a comparison app over 2 to 4 of one user's runs.

    Args:
        secret_key: the installation's secret key (str or bytes).
        user_id: the id of the logged-in user who owns every run.
        runs: [(run folder relative to the storage folder, label shown for the run), ...];
            every folder is checked like ``make_token``'s, one of another user refuses all.
        app_key: ``COMPARE_CURVES_APP`` or ``COMPARE_IMAGES_APP``.
        technique_key: the snapshot technique the images app shows.
        expiration_s: seconds within which the session must be opened.
    """
    if not secret_key:
        raise ValueError("secret_key must be a non-empty string")
    if app_key not in (COMPARE_CURVES_APP, COMPARE_IMAGES_APP):
        raise ValueError("app_key must be a comparison app, got %r" % (app_key,))
    runs = list(runs)
    if not MIN_COMPARED_RUNS <= len(runs) <= MAX_COMPARED_RUNS:
        raise ValueError("a comparison shows %d to %d runs, got %d"
                         % (MIN_COMPARED_RUNS, MAX_COMPARED_RUNS, len(runs)))
    for run_rel_dir, _ in runs:
        storage.check_run_rel_dir(user_id, run_rel_dir)
    session_id = generate_session_id(secret_key=_as_bytes(secret_key), signed=True)
    return generate_jwt_token(session_id, secret_key=_as_bytes(secret_key), signed=True,
                              extra_payload={"user_id": user_id, "compare": app_key,
                                             "runs": [rel for rel, _ in runs],
                                             "labels": [str(label)[:MAX_RUN_LABEL]
                                                        for _, label in runs],
                                             "technique": technique_key},
                              expiration=int(expiration_s))


def embed_compare_script(bokeh_url, secret_key, app_key, user_id, runs, technique_key=None,
                         expiration_s=300):
    """The ``<script>`` HTML that embeds a comparison app; arguments as ``make_compare_token``."""
    token = make_compare_token(secret_key, user_id, runs, app_key, technique_key, expiration_s)
    return server_session(session_id=token, url="%s/%s" % (bokeh_url.rstrip("/"), app_key))


def verify_compare_token(token, secret_key, storage_dir, app_key):
    """The ``CompareGrant`` of a comparison token for app ``app_key``, or ``InvalidToken``.

    Every run folder is checked as ``verify_token`` checks one.
    """
    payload = _signed_payload(token, secret_key)
    if payload.get("compare") != app_key:
        raise InvalidToken("the session token was made for another dashboard")
    user_id, runs, labels = payload.get("user_id"), payload.get("runs"), payload.get("labels")
    if not (isinstance(runs, list) and isinstance(labels, list) and len(runs) == len(labels)
            and MIN_COMPARED_RUNS <= len(runs) <= MAX_COMPARED_RUNS):
        raise InvalidToken("the session token names no runs to compare")
    technique_key = payload.get("technique")
    return CompareGrant(tuple(_granted_run_dir(storage_dir, user_id, rel) for rel in runs),
                        tuple(str(label) for label in labels),
                        technique_key if isinstance(technique_key, str) else None)


def _signed_payload(token, secret_key):
    """The payload of a token signed with ``secret_key`` and not expired, else ``InvalidToken``."""
    if not token:
        raise InvalidToken("no session token")
    try:
        signed = check_token_signature(token, secret_key=_as_bytes(secret_key), signed=True)
        payload = get_token_payload(token) if signed else None
    except ValueError:  # not base64/JSON at all
        signed = False
    if not signed:
        raise InvalidToken("the session token is not signed by this server")
    now = calendar.timegm(datetime.datetime.now(tz=datetime.timezone.utc).timetuple())
    if now >= payload.get("session_expiry", 0):
        raise InvalidToken("the session token has expired; reload the page")
    return payload


def _granted_run_dir(storage_dir, user_id, run_rel_dir):
    """The run folder of ``run_rel_dir`` when it is one of the user's, reached without links."""
    storage.check_run_rel_dir(user_id, run_rel_dir, InvalidToken)
    storage_dir = os.path.realpath(storage_dir)
    run_dir = storage.run_dir_in(storage_dir, run_rel_dir)
    # a run folder (or the user's folder) replaced by a link could lead to another user's run
    if os.path.realpath(run_dir) != run_dir:
        raise InvalidToken("the session token names a run outside the storage folder")
    return run_dir


def _as_bytes(secret_key):
    return secret_key.encode("utf-8") if isinstance(secret_key, str) else secret_key
