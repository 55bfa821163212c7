"""Runs on a Ray cluster: each run is one job of Ray's job API.

``RayRunner`` implements ``visualizer.runner.Runner`` with Ray Jobs
(``ray.job_submission.JobSubmissionClient``). A job's entrypoint is the same
wrapper command a local run uses (``visualizer.runner.wrapper_command``), so the
sandbox, the rlimits and the run's memory and pids cgroups apply on the node that
runs it (the wrapper makes the cgroups there). The wrapper writes output.txt and
status.json straight into the run folder, which every node mounts at the same path
(``VISUALIZER_STORAGE`` on a shared file system); the pages read the run folder as
for a local run.

Ray holds the queue: a job waits ('queued') until a node has the resources it
asks for (``num_cpus``, ``num_gpus``, memory), then runs ('running'). A job that
ended is settled from the wrapper's status.json (exit code, cgroup limits) or,
when the wrapper never ran or was killed, from Ray's message. The runner enforces
the wall-time and disk limits itself (it sees the run folder) and stops the job.

Each job carries metadata naming the installation and the run, so a restarted
server finds its jobs again (``reconcile``). Ray's client authenticates with the
token of the server's environment (``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN``
or ``RAY_AUTH_TOKEN_PATH``); the script gets the run environment only, never the token.
"""
import dataclasses
import os
import shlex
import threading
import time
import uuid

from visualizer import runner as runners
from visualizer import sandbox as sandboxing
from visualizer.runner import (ENDED_STATES, FAILED, GONE_MESSAGE, QUEUED, RUNNING, STOPPED,
                               RunnerUnavailable, RunRefused, RunUpdate)

INSTALLATION_KEY = "visualizer_installation"
RUN_ID_KEY = "visualizer_run_id"
RUN_DIR_KEY = "visualizer_run_dir"
SHUTDOWN_WAIT_S = 30
# How long a run Ray refuses (not ready yet, unreachable) stays queued, tried again at each poll.
SUBMIT_RETRY_S = 60


@dataclasses.dataclass
class _Job:
    run_id: int
    run_dir: str
    submission_id: str
    disk_limit_mb: float | None
    state: str = QUEUED
    script_path: str | None = None
    submitted: bool = True  # False until Ray accepted the job
    submit_until: float = 0.0  # when to give up submitting
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    stop_state: str | None = None  # the state it ends in after the runner stopped it
    stop_reason: str | None = None
    disk_check_due: float = 0.0

    def update(self, message=None):
        return RunUpdate(self.run_id, self.state, self.exit_code, None, self.started_at,
                         self.ended_at, message)


class RayRunner(runners.MonitoredRunner):
    """Runs scripts as jobs on a Ray cluster; thread-safe.

    Args:
        address: the job API address of the cluster, e.g. ``http://127.0.0.1:8265``.
        storage_dir: the installation's storage folder (names its jobs and cgroups).
        num_cpus: CPUs each run asks Ray for.
        num_gpus: GPUs each run asks Ray for; None for none.
        memory_limit_mb: memory each run asks Ray for and may use (its cgroup on the
            node); None for no limit.
        wall_time_s: the most seconds a run may run; None for no limit.
        on_update: called with each ``RunUpdate`` by the monitor thread.
        sandbox: the ``visualizer.sandbox.Sandbox`` every script runs in on the node;
            None runs scripts without one (unsafe).
        disk_limit_mb: the default most disk space, in MB, of a run folder.
        max_processes: the most processes and threads a run may have at once.
        refusal: a message; when given, ``start`` refuses every run with it.
        client: a ``JobSubmissionClient``; None makes one for ``address``.

    Raises:
        RunnerUnavailable: Ray cannot be reached at ``address`` or refused the token.
    """

    def __init__(self, address, storage_dir, num_cpus=1, num_gpus=None, memory_limit_mb=None,
                 wall_time_s=None, on_update=None, sandbox=None,
                 disk_limit_mb=runners.DEFAULT_DISK_MB, max_processes=runners.DEFAULT_PROCESSES,
                 refusal=None, client=None):
        super().__init__(on_update)
        if client is None:
            from ray.job_submission import JobSubmissionClient
            try:
                client = JobSubmissionClient(address)
            except Exception as error:  # noqa: BLE001 -- unreachable, or refused (401)
                raise RunnerUnavailable(
                    "Ray's job API at %s (VISUALIZER_RAY_ADDRESS) cannot be used: %s. Start the "
                    "Ray cluster first; with token authentication the server needs "
                    "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
                    % (address, str(error).splitlines()[0] if str(error) else error)) from None
        self.client = client
        self.storage_dir = os.path.abspath(storage_dir)
        self.installation = sandboxing.instance_name(storage_dir)
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.memory_limit_mb = memory_limit_mb
        self.wall_time_s = wall_time_s
        self.sandbox = sandbox
        self.disk_limit_mb = disk_limit_mb
        self.max_processes = max_processes
        self.refusal = refusal
        self._lock = threading.RLock()
        self._jobs = {}  # run_id -> _Job, queued or running
        self._updates = []

    # --- the Runner interface -------------------------------------------------

    def start(self, run_id, run_dir, script_file, disk_limit_mb=None):
        if self.refusal:
            raise RunRefused(self.refusal)
        run_dir, script_path = runners.checked_run(run_dir, script_file, disk_limit_mb)
        with self._lock:
            if run_id in self._jobs:
                raise ValueError("run %r is already queued or running" % (run_id,))
            limit = self.disk_limit_mb if disk_limit_mb is None else disk_limit_mb
            job = _Job(run_id, run_dir, "%s-run-%d-%s" % (self.installation, int(run_id),
                                                          uuid.uuid4().hex[:8]), limit,
                       submitted=False)
            job.script_path, job.submit_until = script_path, time.time() + SUBMIT_RETRY_S
            self._jobs[run_id] = job
            self._set_state(job, QUEUED)
            self._try_submit(job)

    def stop(self, run_id):
        """Stops a run's job; 'stopped' is reported by ``poll`` once Ray ended it."""
        with self._lock:
            job = self._jobs.get(run_id)
            if job is None or job.stop_state:
                return
            if job.submitted and job.state == QUEUED and self._status(job) == "PENDING":
                # Stopped at once, as a local queued run is. Ray may still start the job
                # (its stop waits for the job's supervisor): the wrapper reads 'stopped' in
                # status.json and runs nothing.
                del self._jobs[run_id]
                job.ended_at = time.time()
                self._set_state(job, STOPPED, "stopped before it started")
                try:
                    self.client.stop_job(job.submission_id)
                except Exception:  # noqa: BLE001 -- the wrapper runs nothing anyway
                    pass
                return
            self._stop_job(job, STOPPED, None)  # the reason depends on whether it started

    def poll(self):
        with self._lock:
            now = time.time()
            for job in list(self._jobs.values()):
                if not job.submitted:
                    self._try_submit(job)
                    continue
                try:
                    info = self.client.get_job_info(job.submission_id)
                except Exception as error:  # noqa: BLE001 -- Ray's client raises RuntimeError
                    if _is_missing(error):
                        self._settle(job, None)
                    continue  # Ray unreachable now: ask again at the next poll
                status = str(info.status.value)
                if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                    self._settle(job, info)
                elif status == "RUNNING":
                    if job.state == QUEUED:
                        job.state, job.started_at = RUNNING, now
                        self._updates.append(job.update())
                    if job.stop_state is None:
                        self._enforce_limits(job, now)
            updates, self._updates = self._updates, []
            return updates

    def reconcile(self, records):
        updates = []
        with self._lock:
            pending, self._updates = self._updates, []  # the updates here go into the result
            found = self._own_jobs()
            for run_id, state, _pid, run_dir, script_file in records:
                run_dir = os.path.abspath(run_dir)
                info = found.get((str(run_id), run_dir))
                job = _Job(run_id, run_dir, info.submission_id if info else "", self.disk_limit_mb,
                           state)
                if info is not None:
                    self._jobs[run_id] = job
                    status = str(info.status.value)
                    if status == "RUNNING":
                        job.state = RUNNING
                        job.started_at = (runners._read_status(run_dir) or {}).get("time",
                                                                                   time.time())
                    elif status == "PENDING":
                        job.state = QUEUED
                    else:
                        self._settle(job, info)
                elif state == QUEUED and not runners._has_started(run_dir):
                    self.start(run_id, run_dir, script_file)  # it never reached Ray
                    job = self._jobs.get(run_id, job)
                else:
                    self._settle(job, None)
                updates.append(job.update(job.stop_reason if job.state in ENDED_STATES else None))
            self._updates = pending
        return updates

    def shutdown(self, stop_runs=True):
        """Stops the monitor thread and, with ``stop_runs``, every running job.

        Running runs end as 'stopped' ("stopped because the server shut down"); queued
        jobs stay queued in Ray, and ``reconcile`` takes them over at the next start.
        Without ``stop_runs`` the jobs go on; ``reconcile`` finds them by their metadata.

        Returns:
            The final updates, also passed to ``on_update``.
        """
        self._stop_monitor()
        with self._lock:
            updates = self.poll()  # which jobs Ray started meanwhile
            if stop_runs:
                for job in list(self._jobs.values()):
                    if job.state == RUNNING and job.stop_state is None:
                        self._stop_job(job, STOPPED, "stopped because the server shut down")
                updates += self.poll()
            deadline = time.time() + SHUTDOWN_WAIT_S
            while stop_runs and any(job.stop_state for job in self._jobs.values()) \
                    and time.time() < deadline:
                time.sleep(0.2)
                updates += self.poll()
        self._deliver(updates)
        return updates

    # --- jobs -------------------------------------------------------------------

    def _try_submit(self, job):
        """Submits ``job``; Ray refusing or unreachable is tried again at the next poll until
        SUBMIT_RETRY_S have passed, then the run fails with Ray's answer."""
        if job.stop_state:
            self._settle(job, None)
            return
        try:
            self._submit(job, job.script_path)
            job.submitted = True
        except Exception as error:  # noqa: BLE001 -- Ray's client raises RuntimeError for all
            if time.time() > job.submit_until:
                self._jobs.pop(job.run_id, None)
                job.ended_at = time.time()
                self._set_state(job, FAILED, "could not submit the run to Ray: %s" % error)

    def _submit(self, job, script_path):
        uid = self.sandbox.run_uid(job.run_id) if self.sandbox else None
        runners.prepare_run_folder(job.run_dir, script_path, uid)
        limits = runners.run_rlimits(job.disk_limit_mb, self.max_processes, uid, False)
        node_cgroups = {"storage_dir": self.storage_dir, "run_id": int(job.run_id),
                        "memory_limit_mb": self.memory_limit_mb,
                        "max_processes": self.max_processes}
        command = runners.wrapper_command(job.run_dir, script_path, self.sandbox, uid,
                                          job.disk_limit_mb, limits, node_cgroups=node_cgroups)
        self.client.submit_job(
            # exec: the wrapper replaces Ray's shell, so Ray's stop signals reach it.
            entrypoint="exec " + shlex.join(command),
            submission_id=job.submission_id,
            metadata={INSTALLATION_KEY: self.installation, RUN_ID_KEY: str(job.run_id),
                      RUN_DIR_KEY: job.run_dir},
            entrypoint_num_cpus=self.num_cpus,
            entrypoint_num_gpus=self.num_gpus,
            entrypoint_memory=runners._bytes(self.memory_limit_mb))

    def _status(self, job):
        """Ray's status of ``job`` ('PENDING', 'RUNNING', ...), or None when Ray did not answer."""
        try:
            return str(self.client.get_job_info(job.submission_id).status.value)
        except Exception:  # noqa: BLE001
            return None

    def _stop_job(self, job, end_state, reason):
        job.stop_state, job.stop_reason = end_state, reason
        if not job.submitted:
            return  # settled at the next poll
        try:
            self.client.stop_job(job.submission_id)
        except Exception as error:  # noqa: BLE001
            if _is_missing(error):
                self._settle(job, None)
            # else Ray is unreachable now; the job is settled once Ray answers again

    def _settle(self, job, info):
        """Ends ``job`` as the wrapper recorded, the runner decided, or Ray said (``info``,
        None when Ray has no such job)."""
        self._jobs.pop(job.run_id, None)
        status = runners._read_status(job.run_dir) or {}
        recorded = status.get("state") in ENDED_STATES
        job.ended_at = status.get("time") if recorded else time.time()
        job.exit_code = status.get("exit_code") if recorded else None
        if job.stop_state:
            state, message = job.stop_state, job.stop_reason or (
                "stopped by the user" if runners._has_started(job.run_dir)
                else "stopped before it started")
        elif recorded:
            state, message = status["state"], status.get("message")
        elif info is None:
            state, message = FAILED, GONE_MESSAGE if job.state == RUNNING else (
                "Ray has no job for this run")
        else:
            state, message = FAILED, "the Ray job ended: %s" % (info.message or info.status)
        job.stop_reason = message
        if (state, message) != (status.get("state"), status.get("message")):
            self._set_state(job, state, message)
        else:
            job.state = state
            self._updates.append(job.update(message))

    def _enforce_limits(self, job, now):
        if self.wall_time_s and job.started_at and now - job.started_at > self.wall_time_s:
            self._stop_job(job, FAILED, "wall time limit of %g s exceeded" % self.wall_time_s)
        elif job.disk_limit_mb and now >= job.disk_check_due:
            used = runners.disk_use_bytes(job.run_dir, runners._bytes(job.disk_limit_mb))
            ended = time.time()
            job.disk_check_due = ended + (ended - now) / runners.DISK_CHECK_SHARE
            if used > runners._bytes(job.disk_limit_mb):
                self._stop_job(job, FAILED, runners._disk_message(job.disk_limit_mb))

    def _own_jobs(self):
        """{(run id, run folder): newest job info} of this installation's jobs in Ray."""
        found = {}
        for info in self.client.list_jobs():
            metadata = info.metadata or {}
            if metadata.get(INSTALLATION_KEY) != self.installation:
                continue
            key = (metadata.get(RUN_ID_KEY), metadata.get(RUN_DIR_KEY))
            if key not in found or (info.start_time or 0) > (found[key].start_time or 0):
                found[key] = info
        return found

    def _set_state(self, job, state, message=None):
        job.state = state
        runners._write_status(job.run_dir, state, job.exit_code, message)
        self._updates.append(job.update(message))


def _is_missing(error):
    """Whether Ray's client said the job does not exist (else it could not be reached)."""
    return "does not exist" in str(error) or "404" in str(error)

