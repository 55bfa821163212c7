"""The start path upgrades the database in place: one made before migrations existed keeps
its users, scripts, tags and runs, and each script's last run its results and output; a
fresh one gets the newest schema."""
import hashlib
import json
import os
import sqlite3

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from conftest import AuthActions, make_test_config, png_bytes
from werkzeug.security import generate_password_hash

from custom_keras import storage
from visualizer import BASELINE_REVISION, MIGRATIONS_DIR, create_app
from visualizer.models import Run, Script, Tag, User, db

# The tables as create_all made them before migrations existed (commit e248c72), and some rows.
SCHEMA_BEFORE_MIGRATIONS = """
CREATE TABLE user (
    id INTEGER NOT NULL, username VARCHAR(20) NOT NULL, password_hash VARCHAR(256) NOT NULL,
    created_at DATETIME NOT NULL, PRIMARY KEY (id), UNIQUE (username));
CREATE TABLE tag (
    id INTEGER NOT NULL, name VARCHAR(40) NOT NULL, PRIMARY KEY (id), UNIQUE (name));
CREATE TABLE script (
    id INTEGER NOT NULL, user_id INTEGER NOT NULL, filename VARCHAR(255) NOT NULL,
    uploaded_at DATETIME NOT NULL, seen_at DATETIME NOT NULL, PRIMARY KEY (id),
    UNIQUE (user_id, filename), FOREIGN KEY(user_id) REFERENCES user (id));
CREATE INDEX ix_script_user_id ON script (user_id);
CREATE TABLE script_tags (
    script_id INTEGER NOT NULL, tag_id INTEGER NOT NULL, PRIMARY KEY (script_id, tag_id),
    FOREIGN KEY(script_id) REFERENCES script (id), FOREIGN KEY(tag_id) REFERENCES tag (id));
CREATE TABLE run (
    id INTEGER NOT NULL, script_id INTEGER NOT NULL, state VARCHAR(10) NOT NULL,
    exit_code INTEGER, pid INTEGER, message TEXT, created_at DATETIME NOT NULL,
    started_at DATETIME, ended_at DATETIME, PRIMARY KEY (id),
    FOREIGN KEY(script_id) REFERENCES script (id));
CREATE INDEX ix_run_script_id ON run (script_id);
"""
NOW = "2026-11-01 10:00:00.000000"


def make_old_database(path):
    """alice has mnist.py (tags mnist, shared) and a finished run; bob has cnn.py (tag shared);
    the tag "unused" is on no script."""
    connection = sqlite3.connect(path)
    connection.executescript(SCHEMA_BEFORE_MIGRATIONS)
    connection.executemany("INSERT INTO user VALUES (?, ?, ?, ?)", [
        (1, "alice_1", generate_password_hash("alice password"), NOW),
        (2, "bobby_2", generate_password_hash("bobby password"), NOW)])
    connection.executemany("INSERT INTO tag VALUES (?, ?)",
                           [(1, "mnist"), (2, "shared"), (3, "unused")])
    connection.executemany("INSERT INTO script VALUES (?, ?, ?, ?, ?)", [
        (1, 1, "mnist.py", NOW, NOW), (2, 2, "cnn.py", NOW, NOW)])
    connection.executemany("INSERT INTO script_tags VALUES (?, ?)", [(1, 1), (1, 2), (2, 2)])
    connection.execute("INSERT INTO run VALUES (1, 1, 'finished', 0, NULL, NULL, ?, ?, ?)",
                       (NOW, NOW, NOW))
    connection.commit()
    connection.close()


def newest_revision():
    return ScriptDirectory(MIGRATIONS_DIR).get_current_head()


def schema_differences(app):
    """What the models have that the database lacks, or the other way round (empty: none)."""
    with app.app_context(), db.engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), db.metadata)


def test_a_database_from_before_migrations_is_upgraded_and_keeps_its_data(tmp_path):
    make_old_database(tmp_path / "test.sqlite")
    app = create_app(make_test_config(tmp_path))
    with app.app_context():
        assert db.session.execute(db.text("SELECT version_num FROM alembic_version")).scalar() \
            == newest_revision()
        assert [u.username for u in User.query.order_by(User.id)] == ["alice_1", "bobby_2"]
        assert {s.filename: (s.user_id, [t.name for t in s.tags]) for s in Script.query} == {
            "mnist.py": (1, ["mnist", "shared"]), "cnn.py": (2, ["shared"])}
        # The shared tag is now one row per user; the tag on no script is gone.
        assert sorted((t.user_id, t.name) for t in Tag.query) == [
            (1, "mnist"), (1, "shared"), (2, "shared")]
        assert [(r.script_id, r.state) for r in Run.query] == [(1, "finished")]
    client = app.test_client()
    response = AuthActions(client).login("alice_1", "alice password")
    assert response.status_code == 302 and response.headers["Location"] == "/"
    page = client.get("/").get_data(as_text=True)
    assert "mnist.py" in page and "cnn.py" not in page
    assert '<span class="tag">shared</span>' in page
    assert schema_differences(app) == []


def test_an_upgraded_database_starts_again_without_changes(tmp_path):
    make_old_database(tmp_path / "test.sqlite")
    create_app(make_test_config(tmp_path))
    app = create_app(make_test_config(tmp_path))
    with app.app_context():
        assert User.query.count() == 2 and Tag.query.count() == 3


def test_a_fresh_database_gets_the_newest_schema_and_revision(tmp_path):
    app = create_app(make_test_config(tmp_path))
    assert schema_differences(app) == []
    with app.app_context():
        assert db.session.execute(db.text("SELECT version_num FROM alembic_version")).scalar() \
            == newest_revision()


def test_a_downgrade_to_the_baseline_merges_tags_by_name_and_keeps_them_on_their_scripts(tmp_path):
    make_old_database(tmp_path / "test.sqlite")
    app = create_app(make_test_config(tmp_path))
    with app.app_context():
        command.downgrade(app.extensions["migrate"].migrate.get_config(), BASELINE_REVISION)
    connection = sqlite3.connect(tmp_path / "test.sqlite")
    assert connection.execute("SELECT id, name FROM tag ORDER BY id").fetchall() == [
        (1, "mnist"), (2, "shared")]
    assert connection.execute("SELECT * FROM script_tags ORDER BY script_id, tag_id").fetchall() \
        == [(1, 1), (1, 2), (2, 2)]
    connection.close()


OLD_OUTPUT = "Epoch 1/1\nloss: 0.5\n"


def make_old_storage(storage_dir):
    """The run folders today's main made for make_old_database's rows: alice's mnist.py ran
    (its one folder holds the script, the image and every result), bob's cnn.py never ran.
    Alice's script also made a ``runs`` file of its own in its folder."""
    old = os.path.join(storage_dir, "1", "mnist")
    files = {"mnist.py": b"print('mnist')\n", "output.txt": OLD_OUTPUT.encode(),
             "status.json": b'{"state": "finished", "exit_code": 0}',
             "images/digit.png": png_bytes(), "networks/mnist.keras": b"old network",
             "runs": b"a file the script wrote",
             "results/" + storage.TRAINING_PROGRESS_TABLE:
                 b"progress\tepoch\tbatch\tloss\taccuracy\n1.0\t0\t9\t0.5\t0.875\n",
             "results/" + storage.ALERTS_FILE: json.dumps({"kind": "nan_loss"}).encode() + b"\n"}
    for name, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(old, name)), exist_ok=True)
        with open(os.path.join(old, name), "wb") as f:
            f.write(data)
    os.makedirs(os.path.join(storage_dir, "2", "cnn"))
    with open(os.path.join(storage_dir, "2", "cnn", "cnn.py"), "w") as f:
        f.write("print('cnn')\n")
    return files


def add_earlier_run(path):
    """Makes alice's finished run 1 an earlier one: run 2 is her last, whose results are kept."""
    connection = sqlite3.connect(path)
    connection.execute("INSERT INTO run VALUES (2, 1, 'finished', 0, NULL, NULL, ?, ?, ?)",
                       (NOW, NOW, NOW))
    connection.commit()
    connection.close()


def test_an_upgraded_installation_keeps_each_scripts_last_run_with_its_results_and_output(
        tmp_path):
    make_old_database(tmp_path / "test.sqlite")
    add_earlier_run(tmp_path / "test.sqlite")
    files = make_old_storage(str(tmp_path / "storage"))
    app = create_app(make_test_config(tmp_path))
    run_folder = tmp_path / "storage" / "1" / "mnist" / "runs" / "2"
    for name, data in files.items():  # moved whole, the script's own "runs" file too
        assert (run_folder / name).read_bytes() == data
    assert (tmp_path / "storage" / "1" / "mnist" / "mnist.py").read_bytes() == files["mnist.py"]
    assert sorted(os.listdir(tmp_path / "storage" / "1")) == ["mnist"]
    assert sorted(os.listdir(tmp_path / "storage" / "2" / "cnn")) == ["cnn.py"]
    with app.app_context():
        runs = {run.id: run for run in Run.query}
        assert [(run.number, run.state) for run in runs.values()] == [
            (1, "finished"), (2, "finished")]
        assert runs[2].final_metrics == {"loss": 0.5, "accuracy": 0.875}
        assert runs[2].alert_count == 1 and runs[2].images == ["digit.png"]
        assert runs[2].script_sha256 == hashlib.sha256(files["mnist.py"]).hexdigest()
    client = app.test_client()
    AuthActions(client).login("alice_1", "alice password")
    page = client.get("/scripts/1").get_data(as_text=True)
    assert 'href="/scripts/1?run=2">2</a>' in page and 'href="/scripts/1?run=1">1</a>' in page
    assert '<span class="metric">loss 0.5</span>' in page
    assert client.get("/scripts/1/output.json").get_json()["lines"] == OLD_OUTPUT.splitlines()
    assert client.get("/scripts/1/output/download").data == OLD_OUTPUT.encode()
    assert client.get("/scripts/1/network").data == b"old network"
    assert client.get("/scripts/1/images/digit.png").data == png_bytes()
    assert client.get("/scripts/1/status.json").get_json()["alert_count"] == 1
    assert "this run's folder is gone" in client.get("/scripts/1?run=1").get_data(as_text=True)
    # and the script runs again, with the old run's image
    client.post("/scripts/1/run", data={"images": "keep"})
    new_run = tmp_path / "storage" / "1" / "mnist" / "runs" / "3"
    assert app.extensions["runner"].started == [(3, str(new_run), str(new_run / "mnist.py"))]
    assert (new_run / "images" / "digit.png").read_bytes() == png_bytes()


def test_an_upgrade_killed_after_moving_a_folder_aside_finishes_at_the_next_start(tmp_path):
    make_old_database(tmp_path / "test.sqlite")
    files = make_old_storage(str(tmp_path / "storage"))
    os.rename(tmp_path / "storage" / "1" / "mnist", tmp_path / "storage" / "1" / ".upgrading-1")
    create_app(make_test_config(tmp_path))
    run_folder = tmp_path / "storage" / "1" / "mnist" / "runs" / "1"
    assert (run_folder / "output.txt").read_bytes() == files["output.txt"]
    assert sorted(os.listdir(tmp_path / "storage" / "1")) == ["mnist"]


def test_a_downgrade_puts_each_scripts_newest_run_back_in_the_old_folder(tmp_path):
    make_old_database(tmp_path / "test.sqlite")
    files = make_old_storage(str(tmp_path / "storage"))
    app = create_app(make_test_config(tmp_path))
    with app.app_context():
        command.downgrade(app.extensions["migrate"].migrate.get_config(), "0002")
    old = tmp_path / "storage" / "1" / "mnist"
    for name, data in files.items():
        assert (old / name).read_bytes() == data


def test_explore_s_revision_keeps_script_runs_and_its_downgrade_drops_exploration_runs(tmp_path):
    """0004 adds explorations and filter marks; a run belongs to a script or an exploration."""
    from visualizer.models import Exploration
    make_old_database(tmp_path / "test.sqlite")
    app = create_app(make_test_config(tmp_path))
    with app.app_context():
        assert [(r.script_id, r.exploration_id) for r in Run.query] == [(1, None)]
        exploration = Exploration(user_id=1, name="net", source="upload", model_sha256="0" * 64)
        db.session.add(Run(exploration=exploration, state="finished"))
        db.session.commit()
        command.downgrade(app.extensions["migrate"].migrate.get_config(), "0002")
    connection = sqlite3.connect(tmp_path / "test.sqlite")
    assert connection.execute("SELECT id, script_id FROM run").fetchall() == [(1, 1)]
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert "exploration" not in tables and "filter_mark" not in tables
    connection.close()
