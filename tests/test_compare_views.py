"""The Compare page: picking runs, who may compare what, the metrics table and the script diff."""
import re

import pytest
from bokeh.util.token import get_token_payload
from conftest import run_update, upload_script

from custom_bokeh import auth as bokeh_auth
from custom_keras import registry, storage
from visualizer.models import Run, db
from visualizer.run_store import apply_run_update, run_folder, run_rel_dir

SOURCE = ("import keras\nEPOCHS = 2\nmodel.compile(optimizer=keras.optimizers.Adam(1e-3))\n"
          "print('done')\n")


def start_run(app, client, script_id, started_at=1_700_000_000.0, ended_at=1_700_000_095.0):
    """Runs the script (the fake runner starts nothing) and records that the run finished."""
    response = client.post("/scripts/%d/run" % script_id, data={"images": "none"},
                           content_type="multipart/form-data")
    assert response.status_code == 302
    with app.app_context():
        run_id = Run.query.order_by(Run.id.desc()).first().id
    apply_run_update(app, run_update(run_id, "finished", exit_code=0, started_at=started_at,
                                     ended_at=ended_at))
    return run_id


def folder_of(app, run_id):
    with app.app_context():
        return run_folder(app, db.session.get(Run, run_id))


@pytest.fixture
def two_runs(app, client, auth):
    """Alice's runs 1 (adam_3.py, Adam(1e-3)) and 2 (adam_2.py, Adam(1e-2))."""
    auth.register_and_login()
    upload_script(client, "adam_3.py", SOURCE)
    upload_script(client, "adam_2.py", SOURCE.replace("Adam(1e-3)", "Adam(1e-2)"))
    return start_run(app, client, 1), start_run(app, client, 2)


def token_payload(script_html):
    """The payload of the comparison token in a Bokeh embed script."""
    return get_token_payload(re.search(r'"Bokeh-Session-Id", "([^"]+)"', script_html).group(1))


def test_the_picker_lists_every_run_with_script_run_number_and_state(client, two_runs):
    page = client.get("/compare").get_data(as_text=True)
    assert 'href="/compare">Compare</a>' in page  # in the top navigation
    for run_id, name in zip(two_runs, ("adam_3.py", "adam_2.py")):
        assert 'name="runs" value="%d"' % run_id in page
        assert name in page
    assert page.count("run 1") == 2 and page.count("finished") >= 2


@pytest.mark.parametrize("runs, message", [
    ("1", "Pick 2 to 4 runs to compare; 1 was picked."),
    ("1,1", "Pick 2 to 4 runs to compare; 1 was picked."),
    ("1,2,3,4,5", "Pick 2 to 4 runs to compare; 5 were picked."),
    ("1,x", "&#39;x&#39; is not a run number; pick the runs from the list."),
])
def test_fewer_than_two_or_more_than_four_runs_get_a_clear_message(app, client, two_runs, runs,
                                                                  message):
    for script_id in (1, 2, 1):  # runs 3, 4, 5
        start_run(app, client, script_id)
    response = client.get("/compare?runs=" + runs)
    assert response.status_code == 400
    page = response.get_data(as_text=True)
    assert message in page
    if runs != "1,x":  # what was picked is still ticked
        assert set(re.findall(r'value="(\d+)" id="run-\d+" checked', page)) == set(
            runs.split(","))


def test_a_long_list_of_runs_is_refused_before_any_is_looked_up(client, two_runs):
    response = client.get("/compare?runs=" + ",".join(map(str, range(1, 10_000))))
    assert response.status_code == 400
    assert "Pick 2 to 4 runs to compare; 9999 were picked." in response.get_data(as_text=True)


def test_another_users_run_is_not_found(app, client, auth, two_runs):
    auth.logout()
    auth.register_and_login("bob_1")
    upload_script(client, "bob.py", SOURCE)
    bobs_run = start_run(app, client, 3)
    assert client.get("/compare?runs=%d,1" % bobs_run).status_code == 404
    assert client.get("/compare?runs=%d,999" % bobs_run).status_code == 404
    auth.logout()
    auth.login()
    assert client.get("/compare?runs=1,%d" % bobs_run).status_code == 404
    assert client.get("/compare?runs=1,2").status_code == 200
    # a foreign run among too many runs: refused for the count, which tells nothing about it
    assert client.get("/compare?runs=1,2,%d,998,999" % bobs_run).status_code == 400


def test_the_page_embeds_both_comparison_apps_with_tokens_for_exactly_these_runs(app, client,
                                                                                two_runs):
    storage.write_snapshot(folder_of(app, 2), "saliency_maps.pickle", {"d.png": b""}, "d.png",
                           {"stage": 0, "epoch": 0, "batch": 0, "step": 0})
    page = client.get("/compare?runs=2,1").get_data(as_text=True)
    scripts = re.findall(r"<script[^>]*>.*?</script>", page, re.S)
    curves = next(s for s in scripts if "/compare_training_progress/autoload.js" in s)
    images = next(s for s in scripts if "/compare_images/autoload.js" in s)
    with app.app_context():
        expected = [run_rel_dir(db.session.get(Run, run_id)) for run_id in (1, 2)]
    for script_html, technique in ((curves, None), (images, "saliency_maps")):
        payload = token_payload(script_html)
        assert payload["runs"] == expected  # oldest run first
        assert payload["labels"][0].startswith("adam_3.py \u00b7 run 1 \u00b7 ")
        assert payload["technique"] == technique
    assert 'option value="saliency_maps" selected' in page


def test_the_technique_choice_lists_what_the_runs_registered_or_have_snapshots_of(app, client,
                                                                                 two_runs):
    page = client.get("/compare?runs=1,2").get_data(as_text=True)
    # before any run registered one: every snapshot technique, the first shown (it says, live,
    # what becomes of it)
    assert re.findall(r'<option value="(\w+)"', page) == [
        t.key for t in registry.SNAPSHOT_TECHNIQUES]
    assert token_payload(next(s for s in re.findall(r"<script[^>]*>.*?</script>", page, re.S)
                              if "/compare_images/" in s))["technique"] == "layer_activations"
    storage.write_techniques(folder_of(app, 1), {"deep_visualization": {"state": "waiting"}})
    storage.write_snapshot(folder_of(app, 2), "saliency_maps.pickle", {"d.png": b""}, "d.png",
                           {"stage": 0, "epoch": 0, "batch": 0, "step": 0})
    page = client.get("/compare?runs=1,2&technique=layer_activations").get_data(as_text=True)
    assert re.findall(r'<option value="(\w+)"', page) == ["saliency_maps", "deep_visualization"]
    assert 'option value="saliency_maps" selected' in page  # not offered: the first instead


def test_the_metrics_table_shows_final_metrics_best_validation_duration_state_and_alerts(
        app, client, two_runs):
    for run_id, (loss, accuracy, val_losses, alerts) in zip(two_runs, [
            (0.25, 0.93, [0.5, 0.3, 0.4], 0), (2.302, 0.11, [2.31, 2.30], 2)]):
        folder = folder_of(app, run_id)
        storage.append_rows(storage.results_path(folder, storage.TRAINING_PROGRESS_TABLE),
                            ["progress", "epoch", "batch", "loss", "accuracy", "loss_avg"],
                            [[0.5, 0, 5, 9.0, 0.1, 9.0], [1.0, 0, 10, loss, accuracy, 1.0]])
        storage.append_rows(storage.results_path(folder, storage.TRAINING_PROGRESS_VAL_TABLE),
                            ["epoch", "val_loss"], [[e + 1, v] for e, v in enumerate(val_losses)])
        for _ in range(alerts):
            storage.write_alert(folder, {"kind": "nan_loss", "epoch": 0, "batch": 3, "step": 3,
                                         "message": "NaN"})
        # the runner reports the end after the run wrote its files: the row keeps the counts
        apply_run_update(app, run_update(run_id, "finished", exit_code=0,
                                         started_at=1_700_000_000.0, ended_at=1_700_000_095.0))
    page = client.get("/compare?runs=1,2").get_data(as_text=True)
    table = page[page.index('class="files metrics-table"'):page.index("</table>",
                                                                      page.index("metrics-table"))]
    cells = lambda header: re.findall(r"<td[^>]*>(.*?)</td>", table.split(header, 1)[1].split(
        "</tr>", 1)[0], re.S)
    assert [re.sub("<[^>]+>", "", c) for c in cells("<th>Final loss</th>")] == ["0.25", "2.302"]
    assert [re.sub("<[^>]+>", "", c) for c in cells("<th>Final accuracy</th>")] == ["0.93", "0.11"]
    assert "loss_avg" not in table and "Final batch" not in table
    assert [re.sub("<[^>]+>", "", c) for c in cells("<th>Best validation</th>")] == [
        "epoch 2: val_loss 0.3", "epoch 2: val_loss 2.3"]
    assert [re.sub("<[^>]+>", "", c) for c in cells("<th>Duration</th>")] == ["1 min 35 s"] * 2
    assert [re.sub("<[^>]+>", "", c) for c in cells("<th>State</th>")] == ["finished"] * 2
    assert [re.sub("<[^>]+>", "", c).strip() for c in cells("<th>Alerts</th>")] == ["0", "2"]


def test_the_script_diff_marks_the_changed_lines(client, two_runs):
    page = client.get("/compare?runs=1,2").get_data(as_text=True)
    diff = page[page.index('<pre class="diff">'):page.index("</pre>", page.index('class="diff"'))]
    assert ('<span class="diff-removed">-model.compile(optimizer=keras.optimizers.Adam(1e-3))'
            '</span>') in diff
    assert ('<span class="diff-added">+model.compile(optimizer=keras.optimizers.Adam(1e-2))'
            '</span>') in diff
    assert '<span class="diff-same"> EPOCHS = 2</span>' in diff
    assert re.search(r'<span class="diff-file">--- adam_3.py \u00b7 run 1 \u00b7 [^<]+</span>',
                     diff)
    assert "identical" not in page


def test_the_script_diff_escapes_the_scripts(app, client, auth):
    auth.register_and_login()
    upload_script(client, "a.py", "x = 1\n")
    upload_script(client, "b.py", "x = '<script>alert(1)</script>'\n")
    start_run(app, client, 1), start_run(app, client, 2)
    page = client.get("/compare?runs=1,2").get_data(as_text=True)
    assert "+x = &#39;&lt;script&gt;alert(1)&lt;/script&gt;&#39;" in page
    assert "<script>alert(1)" not in page


def test_two_runs_of_one_script_have_identical_scripts(app, client, two_runs):
    third = start_run(app, client, 1)
    page = client.get("/compare?runs=1,%d" % third).get_data(as_text=True)
    assert "The two scripts are identical." in page
    assert '<pre class="diff">' not in page


def test_the_diff_compares_the_two_runs_chosen(app, client, two_runs):
    third = start_run(app, client, 1)
    page = client.get("/compare?runs=1,2,%d&diff_a=1&diff_b=%d" % (third, third)).get_data(
        as_text=True)
    assert "The two scripts are identical." in page
    page = client.get("/compare?runs=1,2,%d&diff=%d,2" % (third, third)).get_data(as_text=True)
    assert "diff-added" in page and "Adam(1e-2)" in page


def test_a_comparison_token_cannot_be_made_for_a_foreign_folder():
    with pytest.raises(ValueError):
        bokeh_auth.make_compare_token("k", 3, [("3/a", "a"), ("4/b", "b")],
                                      bokeh_auth.COMPARE_CURVES_APP)
