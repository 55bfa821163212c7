"""RayRunner beyond the runner contract: its settings, Ray's answers it turns into messages
(with a fake job client), and the local head's token and address (marked ``ray``)."""
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from types import SimpleNamespace

import psutil
import pytest

from custom_keras import storage
from visualizer import config
from visualizer.ray_runner import RUN_ID_KEY, RayRunner
from visualizer.runner import GONE_MESSAGE


class FakeJobClient:
    """Answers as Ray's ``JobSubmissionClient`` would, from ``statuses``: {submission id:
    (status, message)}; a job missing from it does not exist."""

    def __init__(self):
        self.submitted = {}  # submission id: submit_job's arguments
        self.statuses = {}

    def submit_job(self, **arguments):
        self.submitted[arguments["submission_id"]] = arguments
        self.statuses[arguments["submission_id"]] = ("PENDING", None)
        return arguments["submission_id"]

    def get_job_info(self, submission_id):
        if submission_id not in self.statuses:
            raise RuntimeError("Job %s does not exist" % submission_id)
        status, message = self.statuses[submission_id]
        return SimpleNamespace(status=SimpleNamespace(value=status), message=message)

    def set_all(self, status, message=None):
        for submission_id in self.statuses:
            self.statuses[submission_id] = (status, message)


@pytest.fixture
def fake_run(tmp_path):
    """(runner, client, run folder) of one run started on a fake Ray."""
    client = FakeJobClient()
    runner = RayRunner("http://ray.test:8265", str(tmp_path), num_cpus=2, num_gpus=1,
                       memory_limit_mb=500, client=client)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "script.py").write_text("print('hi')\n")
    runner.start(5, str(run_dir), "script.py")
    return runner, client, str(run_dir)


def test_the_ray_settings_are_read_from_the_environment():
    settings = config.settings_from_env({"VISUALIZER_RUNNER": "ray",
                                         "VISUALIZER_RAY_ADDRESS": "http://head:8265",
                                         "VISUALIZER_RUN_CPUS": "4", "VISUALIZER_RUN_GPUS": "1"})
    assert (settings["RUNNER_KIND"], settings["RAY_ADDRESS"], settings["RUN_CPUS"],
            settings["RUN_GPUS"]) == ("ray", "http://head:8265", 4, 1)
    defaults = config.settings_from_env({})
    assert (defaults["RUNNER_KIND"], defaults["RAY_ADDRESS"], defaults["RUN_CPUS"],
            defaults["RUN_GPUS"]) == ("local", "http://127.0.0.1:8265", 1, None)
    with pytest.raises(ValueError, match="VISUALIZER_RUNNER must be local or ray"):
        config.settings_from_env({"VISUALIZER_RUNNER": "kubernetes"})


def test_a_run_is_submitted_with_its_resources_metadata_and_the_sandboxed_wrapper(fake_run):
    runner, client, run_dir = fake_run
    [job] = client.submitted.values()
    assert (job["entrypoint_num_cpus"], job["entrypoint_num_gpus"],
            job["entrypoint_memory"]) == (2, 1, 500 * 2 ** 20)
    assert job["metadata"][RUN_ID_KEY] == "5"
    assert job["entrypoint"].startswith("exec ") and run_dir in job["entrypoint"]
    assert [u.state for u in runner.poll()] == ["queued"]
    client.set_all("RUNNING")
    assert [u.state for u in runner.poll()] == ["running"]


def test_a_job_ray_failed_before_the_script_ran_ends_failed_with_rays_reason(fake_run):
    runner, client, run_dir = fake_run
    client.set_all("FAILED", "runtime_env setup failed: no space left on device")
    [*_, ended] = runner.poll()
    assert (ended.state, ended.message) == (
        "failed", "the Ray job ended: runtime_env setup failed: no space left on device")
    assert storage.read_run_status(run_dir)["state"] == "failed"


def test_a_running_job_that_ray_lost_ends_failed(fake_run):
    runner, client, run_dir = fake_run
    client.set_all("RUNNING")
    runner.poll()
    client.statuses.clear()
    [ended] = runner.poll()
    assert (ended.state, ended.message) == ("failed", GONE_MESSAGE)


@pytest.mark.ray
def test_the_job_api_refuses_a_request_without_the_token(ray_head):
    url = ray_head.address + "/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    wrong = urllib.request.Request(url, headers={"Authorization": "Bearer " + "0" * 64})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong, timeout=10)
    assert refused.value.code in (401, 403)
    right = urllib.request.Request(url, headers={"Authorization": "Bearer " + ray_head.token})
    with urllib.request.urlopen(right, timeout=10) as answer:
        assert isinstance(json.load(answer), list)


@pytest.mark.ray
def test_the_job_api_of_the_local_head_listens_on_127_0_0_1_only(ray_head):
    port = int(ray_head.address.rsplit(":", 1)[1])
    addresses = {c.laddr.ip for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert addresses == {"127.0.0.1"}


def test_a_server_that_cannot_reach_ray_says_what_to_do(tmp_path):
    # In a process of its own: Ray's client keeps the first authentication set-up it sees.
    attempt = ("from visualizer.ray_runner import RayRunner\n"
               "RayRunner('http://127.0.0.1:1', %r)\n" % str(tmp_path))
    result = subprocess.run([sys.executable, "-c", attempt], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
                            timeout=120)
    assert result.returncode != 0
    assert re.search(r"RunnerUnavailable: Ray's job API at http://127.0.0.1:1 "
                     r"\(VISUALIZER_RAY_ADDRESS\) cannot be used: .*RAY_AUTH_TOKEN", result.stderr)
