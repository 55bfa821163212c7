"""The start path upgrades the database in place: one made before migrations existed keeps
its users, scripts, tags and runs; a fresh one gets the newest schema."""
import sqlite3

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from conftest import AuthActions, make_test_config
from werkzeug.security import generate_password_hash

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
