"""Benchmark: a wrong password for a known user name against any password for an unknown one.

Both must take as long (issue 10: 106 ms against 5 ms let anyone enumerate
names). Times the median of ROUNDS logins of each kind, interleaved, through the
app's test client on a temporary database; the throttle is cleared before each
login so that no lock-out answers early. Prints both medians and their ratio.
Run with ``.venv/bin/python -m benchmarks.logins``.
"""
import statistics
import tempfile
import time

from visualizer import create_app
from visualizer.models import LoginThrottle, db

ROUNDS = 20


class NoRunner:
    """The app's runner, unused here."""

    def reconcile(self, records):
        return []


def time_login(app, client, username, password):
    with app.app_context():
        LoginThrottle.query.delete()
        db.session.commit()
    started = time.perf_counter()
    response = client.post("/auth/login", data={"username": username, "password": password})
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.status_code  # refused, not locked
    return elapsed


def main():
    folder = tempfile.mkdtemp()
    app = create_app({"TESTING": True, "WTF_CSRF_ENABLED": False, "SECRET_KEY": "benchmark",
                      "INSTANCE_DIR": folder + "/instance", "STORAGE_DIR": folder + "/storage",
                      "SQLALCHEMY_DATABASE_URI": "sqlite:///%s/logins.sqlite" % folder,
                      "RUNNER": NoRunner()})
    client = app.test_client()
    client.post("/auth/register", data={"username": "known_user", "password": "right password",
                                        "confirm": "right password"})
    known, unknown = [], []
    for _ in range(ROUNDS):
        known.append(time_login(app, client, "known_user", "wrong password"))
        unknown.append(time_login(app, client, "unknown_user", "wrong password"))
    known_ms, unknown_ms = 1000 * statistics.median(known), 1000 * statistics.median(unknown)
    print("login, wrong password for a known name:  median %.1f ms of %d" % (known_ms, ROUNDS))
    print("login, any password for an unknown name: median %.1f ms of %d" % (unknown_ms, ROUNDS))
    print("ratio unknown / known: %.2f (1.00 means names cannot be told apart by timing)"
          % (unknown_ms / known_ms))


if __name__ == "__main__":
    main()
