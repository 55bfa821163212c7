"""Compare runs: pick 2 to 4 of the user's runs, then their curves, images, metrics and scripts.

``/compare`` lists the user's runs to pick from; ``/compare?runs=4,7,9`` (or
``runs=4&runs=7``) shows the comparison, oldest run first: the overlaid training curves and one
snapshot technique's images side by side (two live Bokeh apps, each opened with
a comparison token over exactly these run folders), a table of final metrics,
and the diff of two of the runs' scripts. Another user's run is a 404.
"""
import difflib

from flask import Blueprint, abort, current_app, render_template, request
from flask_login import current_user

from custom_bokeh.auth import (COMPARE_CURVES_APP, COMPARE_IMAGES_APP, MAX_COMPARED_RUNS,
                               MIN_COMPARED_RUNS, RUN_COLORS, embed_compare_script)
from custom_keras import registry, storage
from visualizer.models import Run, Script, db
from visualizer.run_store import alert_count, run_folder, run_rel_dir
from visualizer.scripts import run_summary, storage_error_text

bp = Blueprint("compare", __name__)

MAX_DIFF_LINES = 5000   # lines of a script compared; a longer one is not diffed
DIFF_CONTEXT_LINES = 3


class BadChoice(ValueError):
    """The runs asked for cannot be compared; the message says why."""


@bp.route("/compare")
def compare():
    chosen_text = ",".join(request.args.getlist("runs"))
    if not chosen_text.strip():
        return render_template("compare/pick.html", runs=user_runs(), chosen=[])
    run_ids = []
    try:
        run_ids = parse_run_ids(chosen_text)
        check_count(run_ids)  # before the runs are looked up: a long list costs nothing
    except BadChoice as error:  # the picker again, with what was picked still ticked
        return render_template("compare/pick.html", runs=user_runs(), chosen=run_ids,
                               error=str(error)), 400
    runs = [owned_run(run_id) for run_id in run_ids]
    labels = [run_label(run) for run in runs]
    token_runs = [(run_rel_dir(run), label) for run, label in zip(runs, labels)]
    techniques = snapshot_techniques(runs)
    technique = registry.get(request.args.get("technique", ""))
    if technique not in techniques:
        technique = techniques[0]
    config = current_app.config
    curves_script = embed_compare_script(config["BOKEH_URL"], config["SECRET_KEY"],
                                         COMPARE_CURVES_APP, current_user.id, token_runs)
    images_script = embed_compare_script(config["BOKEH_URL"], config["SECRET_KEY"],
                                         COMPARE_IMAGES_APP, current_user.id, token_runs,
                                         technique_key=technique.key)
    if "diff_a" in request.args:  # the two choices of the page's form
        first, second = request.args.get("diff_a", ""), request.args.get("diff_b", "")
    else:
        first, _, second = request.args.get("diff", "").partition(",")
    pair = diff_pair(runs, first, second)
    return render_template(
        "compare/compare.html", runs=runs, labels=labels, colors=RUN_COLORS,
        run_ids=",".join(str(run.id) for run in runs), techniques=techniques,
        technique=technique, curves_script=curves_script, images_script=images_script,
        table=metrics_table(runs), pair=pair, diff=script_diff(*pair),
        training=any(run.is_active for run in runs))


def user_runs():
    """Every run of the current user's scripts, newest first."""
    return (Run.query.join(Script).filter(Script.user_id == current_user.id)
            .order_by(Run.id.desc()).all())


def parse_run_ids(text):
    """The run ids of "4,7,9", each once, oldest run first (so a diff shows what changed).

    Raises:
        BadChoice: a part is not a run number.
    """
    ids = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or len(part) > 18:
            raise BadChoice("%r is not a run number; pick the runs from the list." % part[:40])
        if int(part) not in ids:
            ids.append(int(part))
    return sorted(ids)


def check_count(run_ids):
    count = len(run_ids)
    if not MIN_COMPARED_RUNS <= count <= MAX_COMPARED_RUNS:
        raise BadChoice("Pick %d to %d runs to compare; %d %s picked." % (
            MIN_COMPARED_RUNS, MAX_COMPARED_RUNS, count, "was" if count == 1 else "were"))


def owned_run(run_id):
    """The current user's run with this id; 404 for another user's or a missing one."""
    run = db.session.get(Run, run_id)
    if run is None or run.script is None or run.script.user_id != current_user.id:
        abort(404)  # an exploration's job is not a training run to compare
    return run


def run_label(run):
    """E.g. "mnist_digits.py · run 2 · 2026-11-30 04:12" (the server's local time)."""
    return "%s \u00b7 run %d \u00b7 %s" % (run.script.filename, run.number,
                                         current_app.jinja_env.filters["localtime"](
                                             run.started_at or run.created_at))


def snapshot_techniques(runs):
    """The snapshot techniques that at least one of the runs registered or has snapshots of;
    every one before any run registered one (the panels then say, live, what becomes of it)."""
    folders = [run_folder(current_app, run) for run in runs]
    registered = set()
    for folder in folders:
        registered.update(storage.read_techniques(folder) or {})
    return [technique for technique in registry.SNAPSHOT_TECHNIQUES if technique.key in registered
            or any(storage.file_size(storage.history_index_path(folder, technique.results_file))
                   for folder in folders)] or list(registry.SNAPSHOT_TECHNIQUES)


def metrics_table(runs):
    """The final-metrics table: {"metrics": names, "rows": one dict per run}.

    Each row: state, duration (a timedelta or None), final {metric: value}, best
    validation (epoch, val_loss) or None, alert count, and what could not be read.
    """
    rows, metrics = [], []
    for run in runs:
        summary = run_summary(current_app, run)
        final = summary["final"] or {}
        ordered = sorted(final, key=lambda name: (name != "loss", name))
        metrics += [name for name in ordered if name not in metrics]
        rows.append({"state": run.state, "duration": run.duration, "final": final,
                     "best_epoch": summary["best_epoch"],
                     "alerts": alert_count(current_app, run), "problem": summary["problem"]})
    return {"metrics": metrics, "rows": rows}


def diff_pair(runs, first_id, second_id):
    """The two runs whose scripts are diffed: the chosen ids (text) when they are two different
    compared runs, else the first two."""
    by_id = {str(run.id): run for run in runs}
    first_id, second_id = first_id.strip(), second_id.strip()
    if first_id != second_id and first_id in by_id and second_id in by_id:
        return by_id[first_id], by_id[second_id]
    return runs[0], runs[1]


def run_script_source(run):
    """(the script as the run ran it, or None; why it cannot be shown, or "")."""
    try:
        data = storage.read_run_file(run_folder(current_app, run), run.script.filename,
                                     storage.MAX_SCRIPT_BYTES)
    except FileNotFoundError:
        return None, "the script file of %s is missing" % run_label(run)
    except storage.UnsafeFileError as error:
        return None, "the script of %s is not shown: %s" % (run_label(run), error)
    except OSError as error:
        return None, "the script of %s cannot be read: %s" % (run_label(run),
                                                              storage_error_text(error))
    return data.decode("utf-8", "replace"), ""


def script_diff(run_a, run_b):
    """The unified diff of two runs' scripts.

    Returns:
        {"identical": bool, "lines": [(kind, text)], "problem": str}; kind is
        "file", "hunk", "added", "removed" or "same".
    """
    source_a, problem_a = run_script_source(run_a)
    source_b, problem_b = run_script_source(run_b)
    if source_a is None or source_b is None:
        return {"identical": False, "lines": [],
                "problem": "No diff: %s." % "; ".join(p for p in (problem_a, problem_b) if p)}
    if source_a == source_b:
        return {"identical": True, "lines": [], "problem": ""}
    lines_a, lines_b = source_a.splitlines(), source_b.splitlines()
    if max(len(lines_a), len(lines_b)) > MAX_DIFF_LINES:
        return {"identical": False, "lines": [], "problem": "No diff: the scripts differ, but one "
                "has more than %d lines, more than this page compares." % MAX_DIFF_LINES}
    lines = []
    for line in difflib.unified_diff(lines_a, lines_b, run_label(run_a), run_label(run_b),
                                     n=DIFF_CONTEXT_LINES, lineterm=""):
        if line.startswith(("---", "+++")) and len(lines) < 2:
            kind = "file"
        elif line.startswith("@@"):
            kind = "hunk"
        else:
            kind = {"+": "added", "-": "removed"}.get(line[:1], "same")
        lines.append((kind, line))
    return {"identical": False, "lines": lines, "problem": ""}
