"""Uploading scripts, the file list (sort, search), the Overview tab, tags, delete, downloads,
storage write errors, and the favicon."""
import os

import pytest
from conftest import DiskFullWhileWriting, newest_run_folder, script_folder, upload_script

from visualizer import scripts
from visualizer.models import Run, Script, Tag, db, utcnow


@pytest.fixture
def user(auth):
    auth.register_and_login()


def scripts_of(app):
    with app.app_context():
        return {s.filename: sorted(t.name for t in s.tags) for s in Script.query.all()}


def storage_files(app):
    root = app.config["STORAGE_DIR"]
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files)


def test_upload_stores_script_and_tags(app, client, user):
    response = upload_script(client, "mnist_keras.py", tags="mnist  experiment mnist")
    assert response.status_code == 302 and response.headers["Location"] == "/scripts/1"
    assert scripts_of(app) == {"mnist_keras.py": ["experiment", "mnist", "mnist_keras"]}
    with open(os.path.join(app.config["STORAGE_DIR"], "1", "mnist_keras", "mnist_keras.py")) as f:
        assert f.read() == "print('hello')\n"
    page = client.get("/scripts/1").get_data(as_text=True)
    assert "mnist_keras.py was uploaded." in page
    assert 'class="highlight"' in page  # Pygments


def test_upload_sanitises_path_in_file_name(app, client, user):
    response = upload_script(client, "../../evil.py")
    assert response.status_code == 302
    assert scripts_of(app) == {"evil.py": ["evil"]}
    assert storage_files(app) == [os.path.join("1", "evil", "evil.py")]
    assert not os.path.exists(os.path.join(os.path.dirname(app.config["STORAGE_DIR"]), "evil.py"))


@pytest.mark.parametrize("name, data, message", [
    ("notes.txt", b"print(1)\n", "is not a Python script"),
    ("model.py", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "is not a UTF-8 text file"),
    ("model.py", b"print(1)\x00\n", "holds binary data"),
    ("", b"print(1)\n", "Choose a .py file to upload."),
])
def test_upload_refuses_bad_files(app, client, user, name, data, message):
    response = upload_script(client, name, data)
    assert response.status_code == 400
    assert message in response.get_data(as_text=True)
    assert scripts_of(app) == {} and storage_files(app) == []


def test_upload_refuses_duplicate_name_and_keeps_the_first(app, client, user):
    upload_script(client, "a_script.py", "x = 1\n")
    response = upload_script(client, "a_script.py", "x = 2\n")
    assert response.status_code == 400
    assert "You already have a file named a_script.py" in response.get_data(as_text=True)
    with open(os.path.join(script_folder(app, 1), "a_script.py")) as f:
        assert f.read() == "x = 1\n"
    assert len(scripts_of(app)) == 1


def test_same_file_name_for_two_users(app, client, auth):
    auth.register_and_login("alice_1")
    upload_script(client, "same.py")
    auth.logout()
    auth.register_and_login("bobby_2")
    assert upload_script(client, "same.py").status_code == 302
    assert storage_files(app) == [os.path.join("1", "same", "same.py"),
                                  os.path.join("2", "same", "same.py")]


def test_upload_accepts_syntax_error_with_warning(app, client, user):
    response = upload_script(client, "broken.py", "def f(:\n", follow_redirects=True)
    page = response.get_data(as_text=True)
    assert "broken.py was uploaded, but Python cannot parse it" in page
    assert "broken.py" in scripts_of(app)


def test_a_file_where_the_users_folder_should_be_is_named_and_nothing_is_saved(app, client,
                                                                               user):
    blocker = os.path.join(app.config["STORAGE_DIR"], "1")
    with open(blocker, "w") as f:
        f.write("not a folder")
    response = upload_script(client, "blocked.py", tags="keep-me")
    page = response.get_data(as_text=True)
    assert response.status_code == 500
    assert ("Could not save the upload: Not a directory. Nothing was saved" in page
            and 'value="keep-me"' in page)  # the form again, with the tags typed
    assert app.config["STORAGE_DIR"] not in page  # the reason, not the server's paths
    assert scripts_of(app) == {} and storage_files(app) == ["1"]
    with open(blocker) as f:
        assert f.read() == "not a folder"
    assert client.get("/").status_code == 200
    os.remove(blocker)  # repaired: the same upload works
    assert upload_script(client, "blocked.py").status_code == 302
    assert scripts_of(app) == {"blocked.py": ["blocked"]}


def test_a_full_disk_leaves_no_half_written_script_or_row(app, client, user, monkeypatch):
    upload_script(client, "first.py")
    monkeypatch.setattr(scripts, "open", DiskFullWhileWriting, raising=False)
    response = upload_script(client, "second.py", tags="big")
    monkeypatch.undo()
    assert response.status_code == 500
    assert "Could not save the upload: No space left on device. Nothing was saved" in (
        response.get_data(as_text=True))
    assert scripts_of(app) == {"first.py": ["first"]}
    with app.app_context():
        assert Tag.query.filter_by(name="big").first() is None
    assert storage_files(app) == [os.path.join("1", "first", "first.py")]
    assert upload_script(client, "second.py").status_code == 302


def test_overview_says_why_the_script_cannot_be_read(app, client, user):
    upload_script(client, "first.py")
    folder = script_folder(app, 1)
    os.remove(os.path.join(folder, "first.py"))
    os.makedirs(os.path.join(folder, "first.py", "inner"))  # a folder where the file should be
    page = client.get("/scripts/1").get_data(as_text=True)
    assert "The script file is not shown: first.py is not a regular file." in page


def test_favicon_is_served_without_login_and_linked_from_every_page(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 200 and response.data[:4] == b"\x00\x00\x01\x00"  # ICO
    svg = client.get("/static/favicon.svg")
    assert svg.status_code == 200 and svg.mimetype == "image/svg+xml"
    page = client.get("/auth/login").get_data(as_text=True)
    assert '<link rel="icon" href="/favicon.ico"' in page
    assert '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">' in page


def test_upload_refuses_over_long_tag(app, client, user):
    response = upload_script(client, "tagged.py", tags="x" * 41)
    assert "is longer than 40 characters" in response.get_data(as_text=True)
    assert scripts_of(app) == {}


def test_empty_list_invites_upload(client, user):
    page = client.get("/").get_data(as_text=True)
    assert "You have no files yet." in page and 'href="/upload"' in page


def file_order(client, query):
    page = client.get("/" + query).get_data(as_text=True)
    names = ["alpha.py", "beta.py", "gamma.py"]
    return sorted((n for n in names if ">%s</a>" % n in page), key=lambda n: page.index(">%s<" % n))


def test_list_sorts_by_every_column_and_searches(app, client, user):
    upload_script(client, "beta.py", tags="zeta")
    upload_script(client, "alpha.py", tags="yak")
    upload_script(client, "gamma.py", tags="aardvark")
    with app.app_context():
        scripts = {s.filename: s for s in Script.query.all()}
        base = utcnow()
        for offset, name in enumerate(("gamma.py", "alpha.py", "beta.py")):
            scripts[name].uploaded_at = base.replace(year=2020 + offset)
        run = Run(script=scripts["alpha.py"], state="finished", created_at=base)
        db.session.add(run)
        db.session.commit()
    assert file_order(client, "?sort=name&order=asc") == ["alpha.py", "beta.py", "gamma.py"]
    assert file_order(client, "?sort=name&order=desc") == ["gamma.py", "beta.py", "alpha.py"]
    # tags: "aardvark gamma" < "alpha yak" < "beta zeta"
    assert file_order(client, "?sort=tags&order=asc") == ["gamma.py", "alpha.py", "beta.py"]
    assert file_order(client, "?sort=uploaded&order=asc") == ["gamma.py", "alpha.py", "beta.py"]
    assert file_order(client, "?sort=uploaded&order=desc") == ["beta.py", "alpha.py", "gamma.py"]
    assert file_order(client, "?sort=last_run&order=desc")[0] == "alpha.py"
    assert file_order(client, "?q=GAM") == ["gamma.py"]
    assert file_order(client, "?q=yak") == ["alpha.py"]
    page = client.get("/?q=nothing").get_data(as_text=True)
    assert "No file name or tag matches" in page


def test_list_shows_running_badge_and_last_run(app, client, user):
    upload_script(client, "busy.py")
    with app.app_context():
        db.session.add(Run(script_id=1, state="running"))
        db.session.commit()
    page = client.get("/").get_data(as_text=True)
    assert '<span class="badge badge-running">Running</span>' in page


def test_tags_add_and_remove(app, client, user):
    upload_script(client, "tagged.py", tags="one")
    client.post("/scripts/1/tags", data={"tags": "two three one"})
    assert scripts_of(app) == {"tagged.py": ["one", "tagged", "three", "two"]}
    with app.app_context():
        tag_id = Tag.query.filter_by(name="two").one().id
    assert client.post("/scripts/1/tags/%d/remove" % tag_id).status_code == 302
    assert scripts_of(app) == {"tagged.py": ["one", "tagged", "three"]}
    with app.app_context():
        assert Tag.query.filter_by(name="two").first() is None  # orphan removed
    response = client.post("/scripts/1/tags", data={"tags": "  "}, follow_redirects=True)
    assert "Type one or more tags" in response.get_data(as_text=True)


def test_deleting_a_script_deletes_all_its_runs_rows_and_tags(app, client, user):
    upload_script(client, "gone.py", tags="temp")
    folder = script_folder(app, 1)
    for _ in range(2):
        client.post("/scripts/1/run", data={"images": "none"})
        os.makedirs(os.path.join(newest_run_folder(app, 1), "results"))
        with app.app_context():
            Run.query.order_by(Run.id.desc()).first().state = "finished"
            db.session.commit()
    assert sorted(os.listdir(os.path.join(folder, "runs"))) == ["1", "2"]
    response = client.post("/scripts/1/delete", follow_redirects=True)
    assert "gone.py and all its data were deleted." in response.get_data(as_text=True)
    assert not os.path.exists(folder)
    with app.app_context():
        assert Script.query.count() == 0 and Run.query.count() == 0 and Tag.query.count() == 0


def test_delete_refuses_running_script(app, client, user):
    upload_script(client, "busy.py")
    with app.app_context():
        db.session.add(Run(script_id=1, state="running"))
        db.session.commit()
    response = client.post("/scripts/1/delete", follow_redirects=True)
    assert "busy.py is running; stop it before deleting it." in response.get_data(as_text=True)
    assert os.path.exists(script_folder(app, 1))


def test_download_network_only_when_saved(app, client, user):
    upload_script(client, "net.py")
    page = client.get("/scripts/1").get_data(as_text=True)
    assert "Download network" not in page
    response = client.get("/scripts/1/network", follow_redirects=True)
    assert "net.py has no saved network yet" in response.get_data(as_text=True)
    networks = os.path.join(newest_run_folder(app, 1), "networks")
    os.makedirs(networks)
    with open(os.path.join(networks, "net.keras"), "wb") as f:
        f.write(b"keras-zip")
    assert "Download network" in client.get("/scripts/1").get_data(as_text=True)
    response = client.get("/scripts/1/network")
    assert response.status_code == 200 and response.data == b"keras-zip"
    assert "attachment; filename=net.keras" in response.headers["Content-Disposition"]
