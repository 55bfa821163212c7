"""Starting, watching and stopping training scripts, behind a small interface.

``Runner`` is the interface the web app uses (a cluster backend can implement it
later); ``LocalRunner`` runs scripts as subprocesses on this machine. The runner
knows nothing of Flask or the database: it reports state changes as
``RunUpdate`` objects, and the caller stores them.

How a local run works:

- The run is ``sys.executable -u <script_file>`` with the run folder as working
  directory, its stdout and stderr in ``<run_dir>/output.txt``. It is started by a
  tiny wrapper (this file run as a program, ``python -P runner.py <script>``),
  which waits for the script and writes its exit code into ``status.json``. So
  even when the server is down while a run ends, the next start-up learns the
  real outcome.
- The wrapper is the leader of a new session and process group (its pid is the
  run's pid and group id); the script and everything it starts are in that group.
  Stop sends SIGTERM to the whole group, then SIGKILL after the grace period. When
  the script ends, whatever it left behind in the group is killed too.
- Memory limit: a watchdog sums the resident memory (RSS) of every process in the
  group at each poll and kills the group when it exceeds the limit. RLIMIT_AS is
  no option (TensorFlow reserves far more address space than it uses) and
  RLIMIT_DATA applies per process, not to the children a script starts. The
  watchdog sees memory only every poll interval, so a run can overshoot briefly;
  the kernel's OOM killer remains the last line of defence.
- Wall-time limit: a run still going after the limit is stopped like a user stop
  and ends as 'failed' with the message "wall time limit of N s exceeded".
- States: 'queued' -> 'running' -> 'finished' (exit code 0), 'failed' (non-zero
  exit code, killed by a signal, or a limit) or 'stopped' (a user stop, or the
  server shutting down). ``exit_code`` follows ``subprocess``: a negative number
  is the signal that killed the script.
"""
import abc
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPOSITORY_ROOT not in sys.path:  # when this file runs as the wrapper program
    sys.path.insert(0, REPOSITORY_ROOT)

from custom_keras import storage  # noqa: E402  (needs the path set above)

QUEUED, RUNNING, FINISHED, FAILED, STOPPED = "queued", "running", "finished", "failed", "stopped"
ENDED_STATES = (FINISHED, FAILED, STOPPED)
GONE_MESSAGE = "the server restarted and the process is gone"
# Environment variables a training script must not inherit from the server.
PRIVATE_ENVIRONMENT = ("VISUALIZER_SECRET_KEY", "VISUALIZER_DATABASE_URL")


@dataclasses.dataclass
class RunUpdate:
    """A run's new state, reported by ``Runner.poll`` and ``Runner.reconcile``.

    Args:
        run_id: the caller's id of the run.
        state: 'queued', 'running', 'finished', 'failed' or 'stopped'.
        exit_code: the script's exit code once it ended (negative: killed by that
            signal), else None.
        pid: process id (and process group id) of the run while it runs, else None.
        started_at: ``time.time()`` when the process started, else None.
        ended_at: ``time.time()`` when it ended, else None.
        message: why it failed or stopped, in words; None when there is nothing to say.
    """
    run_id: int
    state: str
    exit_code: int | None = None
    pid: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    message: str | None = None


class Runner(abc.ABC):
    """Starts, watches and stops training scripts."""

    @abc.abstractmethod
    def start(self, run_id, run_dir, script_file):
        """Queues a run; it starts when a slot is free (first in, first out).

        Args:
            run_id: the caller's id of the run.
            run_dir: the run folder (working directory, output and status files).
            script_file: the script, absolute or relative to ``run_dir``.
        """

    @abc.abstractmethod
    def stop(self, run_id):
        """Stops a run: a queued one at once, a running one by ending its process group."""

    @abc.abstractmethod
    def poll(self):
        """Reaps ended runs, starts queued ones, enforces limits; returns the state changes."""

    @abc.abstractmethod
    def reconcile(self, records):
        """Takes over the runs the database calls queued or running, at server start.

        Args:
            records: iterable of ``(run_id, state, pid, run_dir, script_file)``.

        Returns:
            A list of ``RunUpdate``, one per record, with the true state.
        """


@dataclasses.dataclass
class _Run:
    run_id: int
    run_dir: str
    script_path: str
    state: str = QUEUED
    process: subprocess.Popen | None = None  # None for a run adopted after a restart
    pid: int | None = None
    process_start_ticks: int | None = None  # /proc start time, tells a reused pid apart
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    stop_reason: str | None = None  # why the runner is ending it: a message, or None
    stop_state: str | None = None  # the state it ends in after that stop
    kill_at: float | None = None  # when SIGKILL follows the SIGTERM

    def update(self, message=None):
        return RunUpdate(self.run_id, self.state, self.exit_code,
                         self.pid if self.state == RUNNING else None,
                         self.started_at, self.ended_at, message)


class LocalRunner(Runner):
    """Runs scripts as subprocesses on this machine; thread-safe.

    Args:
        max_concurrent: how many runs may run at once; the others wait in a queue.
        memory_limit_mb: the most resident memory, in MB, of a run's whole process
            group; None for no limit.
        wall_time_s: the most seconds a run may run; None for no limit.
        grace_period_s: seconds between SIGTERM and SIGKILL when a run is stopped.
        on_update: called with each ``RunUpdate`` by the monitor thread
            (``start_monitor``) and by ``shutdown``.
    """

    def __init__(self, max_concurrent=2, memory_limit_mb=None, wall_time_s=None,
                 grace_period_s=5, on_update=None):
        if int(max_concurrent) < 1:
            raise ValueError("max_concurrent must be at least 1, got %r" % (max_concurrent,))
        for name, value in (("memory_limit_mb", memory_limit_mb), ("wall_time_s", wall_time_s)):
            if value is not None and value <= 0:
                raise ValueError("%s must be positive or None, got %r" % (name, value))
        if grace_period_s < 0:
            raise ValueError("grace_period_s must not be negative, got %r" % (grace_period_s,))
        self.max_concurrent = int(max_concurrent)
        self.memory_limit_mb = memory_limit_mb
        self.wall_time_s = wall_time_s
        self.grace_period_s = grace_period_s
        self.on_update = on_update
        self._lock = threading.RLock()
        self._queue = deque()  # queued _Run objects, oldest first
        self._running = {}  # run_id -> _Run
        self._updates = []  # state changes not yet returned by poll()
        self._monitor = None
        self._monitor_stop = threading.Event()

    # --- the Runner interface -------------------------------------------------

    def start(self, run_id, run_dir, script_file):
        run_dir = os.path.abspath(run_dir)
        if not os.path.isdir(run_dir):
            raise ValueError("run_dir %r is not a folder" % run_dir)
        script_path = os.path.join(run_dir, script_file)
        if not os.path.isfile(script_path):
            raise ValueError("script_file %r does not exist in %r" % (script_file, run_dir))
        with self._lock:
            if self._find(run_id):
                raise ValueError("run %r is already queued or running" % (run_id,))
            self._queue_run(_Run(run_id, run_dir, script_path))
            self._start_queued()

    def stop(self, run_id):
        """Stops a run; a run that already ended is left as it is.

        A queued run becomes 'stopped' at once; a running one gets SIGTERM on its
        whole process group now and SIGKILL after the grace period (``poll`` does
        that and reports 'stopped' when it is gone).
        """
        with self._lock:
            run = self._find(run_id)
            if run is None:
                return
            if run.state == QUEUED:
                self._queue.remove(run)
                run.ended_at = time.time()
                self._set_state(run, STOPPED, "stopped before it started")
            else:
                self._begin_stop(run, STOPPED, "stopped by the user")

    def poll(self):
        with self._lock:
            now = time.time()
            group_rss = _group_rss_bytes() if self.memory_limit_mb else {}
            for run in list(self._running.values()):
                if self._check_ended(run):
                    continue
                if run.kill_at is not None and now >= run.kill_at:
                    self._signal_run(run, signal.SIGKILL)
                    run.kill_at = None
                elif run.stop_reason is None:
                    self._enforce_limits(run, now, group_rss.get(run.pid, 0))
            self._start_queued()
            updates, self._updates = self._updates, []
            return updates

    def reconcile(self, records):
        updates = []
        with self._lock:
            for run_id, state, pid, run_dir, script_file in records:
                run_dir = os.path.abspath(run_dir)
                run = _Run(run_id, run_dir, os.path.join(run_dir, script_file))
                if state == QUEUED and not _has_started(run_dir):
                    self._queue.append(run)
                else:
                    # The database learns a run's pid a moment after it starts:
                    # without a (valid) one, look for the run's process by its folder.
                    if not (pid and _is_run_process(pid, run_dir)):
                        pid = _find_run_leader(run_dir)
                    if pid:
                        self._adopt(run, pid)
                    else:
                        self._settle_vanished(run)
                updates.append(run.update(self._message_of(run)))
            self._start_queued()
        return updates

    # --- monitor thread and shutdown ------------------------------------------

    def start_monitor(self, interval=0.5):
        """Starts a daemon thread that calls ``poll()`` every ``interval`` seconds
        and passes each update to ``on_update``."""
        if self._monitor is not None and self._monitor.is_alive():
            return
        self._monitor_stop.clear()
        self._monitor = threading.Thread(target=self._monitor_loop, args=(interval,),
                                         name="run-monitor", daemon=True)
        self._monitor.start()

    def shutdown(self, stop_runs=True):
        """Stops the monitor thread and, with ``stop_runs``, every running run.

        Running runs end as 'stopped' ("stopped because the server shut down"):
        SIGTERM to their groups, SIGKILL after the grace period. Queued runs stay
        queued; ``reconcile`` queues them again at the next start. Without
        ``stop_runs`` the runs go on; their wrappers record how they end, and
        ``reconcile`` adopts or settles them at the next start; updates not yet
        delivered are delivered now.

        Returns:
            The final updates, also passed to ``on_update``.
        """
        self._monitor_stop.set()
        if self._monitor is not None:
            self._monitor.join()
            self._monitor = None
        with self._lock:
            if not stop_runs:
                updates, self._updates = self._updates, []
            else:
                updates = self._stop_all()
        self._deliver(updates)
        return updates

    def _stop_all(self):
        """Ends every running run (queued ones stay queued for the next start); returns the updates."""
        self._queue.clear()
        for run in self._running.values():
            if run.stop_reason is None:
                self._begin_stop(run, STOPPED, "stopped because the server shut down")
        updates = self.poll()
        deadline = time.time() + self.grace_period_s + 5
        while self._running and time.time() < deadline:
            time.sleep(0.05)
            updates += self.poll()
        return updates

    def _monitor_loop(self, interval):
        while not self._monitor_stop.wait(interval):
            try:
                self._deliver(self.poll())
            except Exception:  # the runs must stay watched whatever one poll met
                traceback.print_exc()

    def _deliver(self, updates):
        if self.on_update is None:
            return
        for update in updates:
            try:
                self.on_update(update)
            except Exception:  # one failing update must not stop the watching
                traceback.print_exc()

    # --- state changes --------------------------------------------------------

    def _find(self, run_id):
        for run in self._queue:
            if run.run_id == run_id:
                return run
        return self._running.get(run_id)

    def _queue_run(self, run):
        self._queue.append(run)
        self._set_state(run, QUEUED)

    def _set_state(self, run, state, message=None):
        run.state = state
        _write_status(run.run_dir, state, run.exit_code, message)
        self._updates.append(run.update(message))

    def _start_queued(self):
        while self._queue and len(self._running) < self.max_concurrent:
            run = self._queue.popleft()
            try:
                self._launch(run)
            except OSError as error:
                run.ended_at = time.time()
                self._set_state(run, FAILED, "could not start the script: %s" % error)

    def _launch(self, run):
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENVIRONMENT}
        env.update({
            storage.RUN_DIR_ENV: run.run_dir,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(
                [REPOSITORY_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]),
        })
        # 'running' goes into status.json before the process exists, so it can
        # never overwrite the outcome that a very short script's wrapper records.
        run.state, run.started_at = RUNNING, time.time()
        storage.write_run_status(run.run_dir, RUNNING)
        with open(storage.output_path(run.run_dir), "wb") as output:
            # -P: the wrapper's folder (visualizer/) must not shadow standard modules.
            run.process = subprocess.Popen(
                [sys.executable, "-P", os.path.abspath(__file__), run.script_path],
                cwd=run.run_dir, env=env, stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT, start_new_session=True)
        run.pid = run.process.pid
        run.process_start_ticks = _process_start_ticks(run.pid)
        self._running[run.run_id] = run
        self._updates.append(run.update())

    def _adopt(self, run, pid):
        run.pid = pid
        run.process_start_ticks = _process_start_ticks(pid)
        status = storage.read_run_status(run.run_dir) or {}
        run.started_at = status.get("time") if status.get("state") == RUNNING else time.time()
        run.state = RUNNING
        self._running[run.run_id] = run

    def _settle_vanished(self, run):
        """A run whose process is gone: its wrapper's status.json tells how it ended, if it could."""
        status = storage.read_run_status(run.run_dir) or {}
        run.ended_at = time.time()
        if status.get("state") in ENDED_STATES:
            run.state, run.exit_code = status["state"], status.get("exit_code")
            run.ended_at = status.get("time", run.ended_at)
            run.stop_reason = status.get("message")
        else:
            run.state, run.stop_reason = FAILED, GONE_MESSAGE
            _write_status(run.run_dir, FAILED, None, GONE_MESSAGE)

    @staticmethod
    def _message_of(run):
        return run.stop_reason if run.state in ENDED_STATES else None

    def _begin_stop(self, run, end_state, reason, first_signal=signal.SIGTERM):
        run.stop_state, run.stop_reason = end_state, reason
        self._signal_run(run, first_signal)
        run.kill_at = time.time() + self.grace_period_s

    @staticmethod
    def _signal_run(run, sig):
        """Signals the run's process group.

        An adopted run's leader is not our child: once it is gone its pid may be
        reused, so then only the group members that are verifiably the run's
        get the signal.
        """
        if run.process is not None or _process_start_ticks(run.pid) == run.process_start_ticks:
            _signal_group(run.pid, sig)
        else:
            _signal_group_members(run.pid, run.run_dir, sig)

    def _enforce_limits(self, run, now, rss_bytes):
        if self.wall_time_s and now - run.started_at > self.wall_time_s:
            self._begin_stop(run, FAILED, "wall time limit of %g s exceeded" % self.wall_time_s)
        elif self.memory_limit_mb and rss_bytes > self.memory_limit_mb * 2 ** 20:
            # No grace period: the run would only take more memory meanwhile.
            self._begin_stop(run, FAILED, "memory limit of %g MB exceeded (it used %d MB)"
                             % (self.memory_limit_mb, rss_bytes // 2 ** 20), signal.SIGKILL)

    def _check_ended(self, run):
        """Settles ``run`` if its wrapper process ended; returns whether it did."""
        if run.process is not None:
            # WNOWAIT leaves the ended wrapper a zombie, so its pid (the group id)
            # cannot be reused while the group's leftovers get killed.
            try:
                ended = os.waitid(os.P_PID, run.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                ended = True
            if not ended:
                return False
            _signal_group(run.pid, signal.SIGKILL)
            _wait_until_group_gone(run.pid)
            exit_code = run.process.wait()
        else:
            if _process_start_ticks(run.pid) == run.process_start_ticks:
                return False
            _signal_group_members(run.pid, run.run_dir, signal.SIGKILL)
            _wait_until_group_gone(run.pid)
            status = storage.read_run_status(run.run_dir) or {}
            exit_code = status.get("exit_code") if status.get("state") in ENDED_STATES else None
        run.exit_code, run.ended_at, run.kill_at = exit_code, time.time(), None
        del self._running[run.run_id]
        if run.stop_state:
            state, message = run.stop_state, run.stop_reason
        elif exit_code is None:
            state, message = FAILED, "the run ended while the server was down; its exit code is unknown"
        else:
            state, message = outcome(exit_code)
        self._set_state(run, state, message)
        return True


def _write_status(run_dir, state, exit_code=None, message=None):
    """status.json for the run; a full or broken disk must not stop the runner (the
    database still gets the state), so a failed write is only reported."""
    try:
        storage.write_run_status(run_dir, state, exit_code, message)
    except OSError as error:
        print("visualizer runner: could not write the status of %s: %s" % (run_dir, error),
              file=sys.stderr, flush=True)


def outcome(exit_code):
    """(state, message) of a script that ended by itself with ``exit_code``."""
    if exit_code == 0:
        return FINISHED, None
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = "signal %d" % -exit_code
        return FAILED, "killed by signal %s" % name
    return FAILED, "exited with code %d" % exit_code


# --- processes ----------------------------------------------------------------

def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _read_stat(pid):
    """The fields of /proc/<pid>/stat after the command name, or None if it is gone.

    Index 0 is the state, 2 the process group, 19 the start time, 21 the RSS in pages.
    """
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rfind(b")") + 2:].split()


def _process_start_ticks(pid):
    """Start time of a live (not zombie) process, which tells a reused pid apart; else None."""
    fields = _read_stat(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _is_run_process(pid, run_dir):
    """Whether ``pid`` is alive and really a run of ``run_dir`` (pids get reused)."""
    if _process_start_ticks(pid) is None:
        return False
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            environ = f.read().split(b"\0")
    except OSError:
        return False
    expected = ("%s=%s" % (storage.RUN_DIR_ENV, run_dir)).encode()
    return expected in environ


def _has_started(run_dir):
    """Whether the run of ``run_dir`` got past 'queued'.

    The web app deletes status.json before it queues a run, and the runner writes
    'running' there before the process starts; so any later state means this run
    started, even if the database (updated a moment later) still calls it queued.
    """
    return (storage.read_run_status(run_dir) or {}).get("state") not in (None, QUEUED)


def _find_run_leader(run_dir):
    """The pid of the live wrapper (group leader) running in ``run_dir``, or None."""
    for pid, fields in _all_processes().items():
        if int(fields[2]) == pid and _is_run_process(pid, run_dir):
            return pid
    return None


def _all_processes():
    """{pid: stat fields} of every process on the machine."""
    processes = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _read_stat(int(name))
            if fields is not None:
                processes[int(name)] = fields
    return processes


def _group_rss_bytes():
    """{process group id: summed resident memory in bytes} of every group."""
    page_size = os.sysconf("SC_PAGE_SIZE")
    totals = {}
    for fields in _all_processes().values():
        pgid = int(fields[2])
        totals[pgid] = totals.get(pgid, 0) + int(fields[21]) * page_size
    return totals


def _wait_until_group_gone(pgid, timeout_s=2):
    """Waits (briefly: SIGKILL takes effect within moments) until no live process is in the group,
    so that an ended run has really left nothing running."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and any(
            int(fields[2]) == pgid and fields[0] not in (b"Z", b"X")
            for fields in _all_processes().values()):
        time.sleep(0.01)


def _signal_group_members(pgid, run_dir, sig):
    """Signals the processes of group ``pgid`` that are verifiably runs of ``run_dir``."""
    for pid, fields in _all_processes().items():
        if int(fields[2]) == pgid and _is_run_process(pid, run_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


# --- the wrapper program --------------------------------------------------------

def _wrap(script_path):
    """Runs the script, records its exit code in status.json, ends the same way.

    SIGTERM is caught (and so reset to the default in the script) so that the
    wrapper outlives a stop long enough to record the outcome.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    script = subprocess.Popen([sys.executable, "-u", script_path])
    exit_code = script.wait()
    state, message = outcome(exit_code)
    _write_status(os.getcwd(), state, exit_code, message)
    if exit_code < 0:  # end by the same signal, so the runner sees it too
        if -exit_code != signal.SIGKILL:
            signal.signal(-exit_code, signal.SIG_DFL)
        os.kill(os.getpid(), -exit_code)
    sys.exit(exit_code)


if __name__ == "__main__":
    _wrap(sys.argv[1])
