"""Starting, watching and stopping training scripts, behind a small interface.

``Runner`` is the interface the web app uses (a cluster backend can implement it
later); ``LocalRunner`` runs scripts as subprocesses on this machine. The runner
knows nothing of Flask or the database: it reports state changes as
``RunUpdate`` objects, and the caller stores them.

How a local run works:

- A tiny wrapper (this file run as a program, ``python -P runner.py <run_dir>
  <spec>``) starts the script, waits for it and writes its exit code into
  ``status.json``; so even when the server is down while a run ends, the next
  start-up learns the real outcome. The wrapper is the leader of a new session,
  outside the sandbox; its pid is the run's pid.
- The script runs in a sandbox (``visualizer.sandbox``): bubblewrap namespaces,
  an unprivileged uid, a read-only system and its own run folder only. Its
  stdout and stderr go to ``<run_dir>/output.txt``, opened by the runner without
  following links (the script controls that folder). With the sandbox off
  (``sandbox=None``) the wrapper runs the script directly and is its child
  subreaper, so a child that escapes its process group stays below the wrapper.
- Every process of the run is in the run's memory and pids cgroups where the
  machine has them, and in the sandbox's PID namespace; so a child that calls
  ``setsid()`` or double-forks is still counted, limited and killed.
- Stop sends SIGTERM to the script and everything it started, then SIGKILL to
  all of the run, wrapper included, after the grace period (again at every poll
  until it is gone). When the script ends, whatever it left behind is killed too
  (the sandbox's PID namespace ends with it).
- Limits: memory of everything the run started (the cgroup; without one, a
  watchdog sums the resident memory of the run's processes at each poll),
  processes and threads (pids cgroup, else RLIMIT_NPROC and the same watchdog),
  open files (RLIMIT_NOFILE), file size (RLIMIT_FSIZE), no core dumps
  (RLIMIT_CORE), disk use of the run folder (measured at each poll without
  following links, less often for a folder of many files; every file or folder
  counts at least one 4 KB block) and wall time. Over a limit, the run is
  stopped and ends 'failed' with the limit named.
- States: 'queued' -> 'running' -> 'finished' (exit code 0), 'failed' (non-zero
  exit code, killed by a signal, or a limit) or 'stopped' (a user stop, or the
  server shutting down). ``exit_code`` follows ``subprocess``: a negative number
  is the signal that killed the script (inside the sandbox an exit code above 128
  is read as 128 + a signal, as shells do).
"""
import abc
import ctypes
import dataclasses
import json
import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections import deque

import psutil

from custom_keras import storage
from visualizer import sandbox as sandboxing

QUEUED, RUNNING = storage.RUN_QUEUED, storage.RUN_RUNNING
FINISHED, FAILED, STOPPED = storage.RUN_FINISHED, storage.RUN_FAILED, storage.RUN_STOPPED
ENDED_STATES = storage.RUN_ENDED_STATES
GONE_MESSAGE = "the server restarted and the process is gone"
WRAPPER_FILE = os.path.abspath(__file__)
DEFAULT_DISK_MB = 2048
DEFAULT_PROCESSES = 1024
MAX_OPEN_FILES = 4096
# The run folder is measured at every poll, but at most DISK_CHECK_SHARE of the time
# goes to measuring (a folder of many files is measured less often).
DISK_CHECK_SHARE = 0.05
DISK_BLOCK_BYTES = 4096
STATUS_READ_LIMIT_BYTES = 64 * 1024
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1


@dataclasses.dataclass
class RunUpdate:
    """A run's new state, reported by ``Runner.poll`` and ``Runner.reconcile``.

    Args:
        run_id: the caller's id of the run.
        state: 'queued', 'running', 'finished', 'failed' or 'stopped'.
        exit_code: the script's exit code once it ended (negative: killed by that
            signal), else None.
        pid: process id of the run's wrapper while it runs, else None.
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
    def start(self, run_id, run_dir, script_file, disk_limit_mb=None):
        """Queues a run; it starts when a slot is free (first in, first out).

        Args:
            run_id: the caller's id of the run.
            run_dir: the run folder (working directory, output and status files).
            script_file: the script, absolute or relative to ``run_dir``.
            disk_limit_mb: a lower disk limit, in MB, for this run folder (what is
                left of its user's storage); the runner's configured per-run limit
                holds as well. None: the configured limit alone.
        """

    @abc.abstractmethod
    def stop(self, run_id):
        """Stops a run: a queued one at once, a running one by ending all its processes."""

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


class RunRefused(Exception):
    """This runner runs no scripts (the sandbox cannot be had); the message says why."""


class RunnerUnavailable(Exception):
    """The runner's cluster cannot be reached or refused the server; the message says what to do."""


class MonitoredRunner(Runner):
    """A runner with a monitor thread that polls it and passes each update on.

    Args:
        on_update: called with each ``RunUpdate`` by the monitor thread
            (``start_monitor``) and by ``shutdown``.
    """

    def __init__(self, on_update=None):
        self.on_update = on_update
        self._monitor = None
        self._monitor_stop = threading.Event()

    def start_monitor(self, interval=0.5):
        """Starts a daemon thread that calls ``poll()`` every ``interval`` seconds
        and passes each update to ``on_update``."""
        if self._monitor is not None and self._monitor.is_alive():
            return
        self._monitor_stop.clear()
        self._monitor = threading.Thread(target=self._monitor_loop, args=(interval,),
                                         name="run-monitor", daemon=True)
        self._monitor.start()

    def _stop_monitor(self):
        self._monitor_stop.set()
        if self._monitor is not None:
            self._monitor.join()
            self._monitor = None

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


@dataclasses.dataclass
class _Run:
    run_id: int
    run_dir: str
    script_path: str
    disk_limit_mb: float | None = None
    state: str = QUEUED
    process: subprocess.Popen | None = None  # None for a run adopted after a restart
    wrapper: psutil.Process | None = None  # tells a reused pid apart
    pid: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    stop_reason: str | None = None  # why the runner is ending it: a message, or None
    stop_state: str | None = None  # the state it ends in after that stop
    kill_at: float | None = None  # when SIGKILL follows the SIGTERM (repeated until it ended)
    terminated: set = dataclasses.field(default_factory=set)  # (pid, start) that got SIGTERM
    disk_check_due: float = 0.0

    def update(self, message=None):
        return RunUpdate(self.run_id, self.state, self.exit_code,
                         self.pid if self.state == RUNNING else None,
                         self.started_at, self.ended_at, message)


class LocalRunner(MonitoredRunner):
    """Runs scripts as sandboxed subprocesses on this machine; thread-safe.

    Args:
        max_concurrent: how many runs may run at once; the others wait in a queue.
        memory_limit_mb: the most memory, in MB, of everything a run started;
            None for no limit.
        wall_time_s: the most seconds a run may run; None for no limit.
        grace_period_s: seconds between SIGTERM and SIGKILL when a run is stopped.
        on_update: called with each ``RunUpdate`` by the monitor thread
            (``start_monitor``) and by ``shutdown``.
        sandbox: the ``visualizer.sandbox.Sandbox`` every script runs in; None runs
            scripts without one (unsafe: they can reach all the server can).
        cgroups: ``visualizer.sandbox.Cgroups`` for memory and process limits, or
            None to do without (a memory watchdog and RLIMIT_NPROC instead).
        disk_limit_mb: the default most disk space, in MB, of a run folder.
        max_processes: the most processes and threads a run may have at once.
        refusal: a message; when given, ``start`` refuses every run with it (the
            sandbox cannot be had and was not switched off).
    """

    def __init__(self, max_concurrent=2, memory_limit_mb=None, wall_time_s=None,
                 grace_period_s=5, on_update=None, sandbox=None, cgroups=None,
                 disk_limit_mb=DEFAULT_DISK_MB, max_processes=DEFAULT_PROCESSES, refusal=None):
        if int(max_concurrent) < 1:
            raise ValueError("max_concurrent must be at least 1, got %r" % (max_concurrent,))
        for name, value in (("memory_limit_mb", memory_limit_mb), ("wall_time_s", wall_time_s),
                            ("disk_limit_mb", disk_limit_mb), ("max_processes", max_processes)):
            if value is not None and value <= 0:
                raise ValueError("%s must be positive or None, got %r" % (name, value))
        if grace_period_s < 0:
            raise ValueError("grace_period_s must not be negative, got %r" % (grace_period_s,))
        self.max_concurrent = int(max_concurrent)
        self.memory_limit_mb = memory_limit_mb
        self.wall_time_s = wall_time_s
        self.grace_period_s = grace_period_s
        super().__init__(on_update)
        self.sandbox = sandbox
        self.cgroups = cgroups
        self.disk_limit_mb = disk_limit_mb
        self.max_processes = max_processes
        self.refusal = refusal
        self._lock = threading.RLock()
        self._queue = deque()  # queued _Run objects, oldest first
        self._running = {}  # run_id -> _Run
        self._updates = []  # state changes not yet returned by poll()

    # --- the Runner interface -------------------------------------------------

    def start(self, run_id, run_dir, script_file, disk_limit_mb=None):
        if self.refusal:
            raise RunRefused(self.refusal)
        run_dir, script_path = checked_run(run_dir, script_file, disk_limit_mb)
        with self._lock:
            if self._find(run_id):
                raise ValueError("run %r is already queued or running" % (run_id,))
            limit = min((mb for mb in (self.disk_limit_mb, disk_limit_mb) if mb is not None),
                        default=None)
            self._queue_run(_Run(run_id, run_dir, script_path, limit))
            self._start_queued()

    def stop(self, run_id):
        """Stops a run; a run that already ended is left as it is.

        A queued run becomes 'stopped' at once; a running one gets SIGTERM on all
        its processes now and SIGKILL after the grace period (``poll`` does that
        and reports 'stopped' when it is gone).
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
        disk_use = self._measure_disks()
        with self._lock:
            now = time.time()
            for run in list(self._running.values()):
                if self._check_ended(run):
                    continue
                if run.kill_at is not None and now >= run.kill_at:
                    # Again at every poll until the wrapper is gone: what was still starting
                    # at the first SIGKILL is killed at the next.
                    self._signal_run(run, signal.SIGKILL)
                elif run.kill_at is not None:
                    self._signal_run(run, signal.SIGTERM)  # what started since the stop
                elif run.stop_reason is None:
                    self._enforce_limits(run, now, disk_use.get(run.run_id))
            self._start_queued()
            updates, self._updates = self._updates, []
            return updates

    def reconcile(self, records):
        updates = []
        with self._lock:
            for run_id, state, pid, run_dir, script_file in records:
                run_dir = os.path.abspath(run_dir)
                run = _Run(run_id, run_dir, os.path.join(run_dir, script_file), self.disk_limit_mb)
                if state == QUEUED and not _has_started(run_dir):
                    self._queue.append(run)
                else:
                    # The database learns a run's pid a moment after it starts:
                    # without a (valid) one, look for the run's wrapper by its folder.
                    wrapper = _wrapper_process(pid, run_dir) if pid else None
                    wrapper = wrapper or _find_wrapper(run_dir)
                    if wrapper:
                        self._adopt(run, wrapper)
                    else:
                        self._settle_vanished(run)
                updates.append(run.update(self._message_of(run)))
            self._start_queued()
        return updates

    # --- shutdown ------------------------------------------------------------

    def shutdown(self, stop_runs=True):
        """Stops the monitor thread and, with ``stop_runs``, every running run.

        Running runs end as 'stopped' ("stopped because the server shut down"):
        SIGTERM to all their processes, SIGKILL after the grace period. Queued runs
        stay queued; ``reconcile`` queues them again at the next start. Without
        ``stop_runs`` the runs go on; their wrappers record how they end, and
        ``reconcile`` adopts or settles them at the next start; updates not yet
        delivered are delivered now.

        Returns:
            The final updates, also passed to ``on_update``.
        """
        self._stop_monitor()
        with self._lock:
            if not stop_runs:
                updates, self._updates = self._updates, []
            else:
                updates = self._stop_all()
                if self.cgroups is not None:
                    self.cgroups.close()
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
                if self.cgroups is not None:
                    self.cgroups.remove(run.run_id)
                run.ended_at = time.time()
                self._set_state(run, FAILED, "could not start the script: %s" % error)

    def _launch(self, run):
        uid = self.sandbox.run_uid(run.run_id) if self.sandbox else None
        cgroups = (self.cgroups.create(run.run_id, _bytes(self.memory_limit_mb), self.max_processes)
                   if self.cgroups else [])
        limits = run_rlimits(run.disk_limit_mb, self.max_processes, uid,
                             bool(self.cgroups and self.cgroups.has(sandboxing.PIDS)))
        command = wrapper_command(run.run_dir, run.script_path, self.sandbox, uid,
                                  run.disk_limit_mb, limits, cgroups=cgroups)
        # 'running' goes into status.json before the process exists, so it can
        # never overwrite the outcome that a very short script's wrapper records.
        run.state, run.started_at = RUNNING, time.time()
        storage.write_run_status(run.run_dir, RUNNING)
        prepare_run_folder(run.run_dir, run.script_path, uid)
        run.process = subprocess.Popen(
            command, cwd=run.run_dir, env=sandboxing.run_environment(run.run_dir),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        run.pid = run.process.pid
        run.wrapper = psutil.Process(run.pid)
        self._running[run.run_id] = run
        self._updates.append(run.update())

    def _adopt(self, run, wrapper):
        run.pid, run.wrapper = wrapper.pid, wrapper
        status = _read_status(run.run_dir) or {}
        run.started_at = status.get("time") if status.get("state") == RUNNING else time.time()
        run.state = RUNNING
        self._running[run.run_id] = run

    def _settle_vanished(self, run):
        """A run whose process is gone: its wrapper's status.json tells how it ended, if it could."""
        status = _read_status(run.run_dir) or {}
        run.ended_at = time.time()
        limit_message = self._limit_message(run)
        if self.cgroups is not None:
            self.cgroups.remove(run.run_id)
        if status.get("state") in ENDED_STATES:
            run.state, run.exit_code = status["state"], status.get("exit_code")
            run.ended_at = status.get("time", run.ended_at)
            run.stop_reason = status.get("message")
            if limit_message:
                run.state, run.stop_reason = FAILED, limit_message
                _write_status(run.run_dir, FAILED, run.exit_code, limit_message)
        else:
            run.state, run.stop_reason = FAILED, GONE_MESSAGE
            _write_status(run.run_dir, FAILED, None, GONE_MESSAGE)

    @staticmethod
    def _message_of(run):
        return run.stop_reason if run.state in ENDED_STATES else None

    def _begin_stop(self, run, end_state, reason, first_signal=signal.SIGTERM):
        run.stop_state, run.stop_reason = end_state, reason
        self._signal_run(run, first_signal)
        grace = self.grace_period_s if first_signal == signal.SIGTERM else 0
        run.kill_at = time.time() + grace

    def _signal_run(self, run, sig):
        """Signals the run's processes.

        SIGTERM goes to the script and everything it started (not to the wrapper,
        which then records how the script ended), once to each process: ``poll``
        repeats it for processes that started since. SIGKILL goes to the wrapper and the
        sandbox too, whose PID namespace then ends with all that is in it, escaped or
        not, and to every process in the run's cgroups; this runner records the end.
        """
        if sig == signal.SIGKILL and self.cgroups is not None:
            self.cgroups.kill(run.run_id, timeout_s=0)
        skipped = 2 if self.sandbox is not None and sig != signal.SIGKILL else 0
        processes = _processes_below(run.wrapper, skipped)
        if sig == signal.SIGKILL and _is_alive(run.wrapper):
            processes.insert(0, run.wrapper)
        for process in processes:
            try:
                if sig == signal.SIGTERM:
                    key = (process.pid, process.create_time())
                    if key in run.terminated:
                        continue
                    run.terminated.add(key)
                process.send_signal(sig)
            except psutil.Error:
                pass

    def _enforce_limits(self, run, now, disk_bytes):
        if self.wall_time_s and now - run.started_at > self.wall_time_s:
            self._begin_stop(run, FAILED, "wall time limit of %g s exceeded" % self.wall_time_s)
            return
        message = self._limit_message(run)
        if message is None and disk_bytes is not None and disk_bytes > _bytes(run.disk_limit_mb):
            message = _disk_message(run.disk_limit_mb)
        if message is None:
            message = self._watchdog_message(run)
        if message is not None:
            # No grace period: the run would only take more meanwhile.
            self._begin_stop(run, FAILED, message, signal.SIGKILL)

    def _watchdog_message(self, run):
        """Without cgroups: which limit the run's processes, counted now, are over, or None."""
        watch_memory = self.memory_limit_mb and not (self.cgroups and
                                                     self.cgroups.has(sandboxing.MEMORY))
        watch_processes = self.max_processes and not (self.cgroups and
                                                      self.cgroups.has(sandboxing.PIDS))
        if not (watch_memory or watch_processes):
            return None
        processes = _processes_below(run.wrapper)
        if watch_processes and _thread_count(processes) >= self.max_processes:
            return _process_message(self.max_processes)
        if watch_memory:
            used = _resident_bytes(processes)
            if used > _bytes(self.memory_limit_mb):
                return "%s (it used %d MB)" % (_memory_message(self.memory_limit_mb),
                                               used // 2 ** 20)
        return None

    def _limit_message(self, run):
        """Which cgroup limit the run ran into, in words, or None."""
        return cgroup_limit_message(self.cgroups, run.run_id, self.memory_limit_mb,
                                    self.max_processes)

    def _measure_disks(self):
        """{run_id: bytes} of the run folders due for a disk check, measured without the lock."""
        with self._lock:
            due = [run for run in self._running.values()
                   if run.disk_limit_mb and run.stop_reason is None
                   and time.time() >= run.disk_check_due]
        measured = {}
        for run in due:
            started = time.time()
            measured[run.run_id] = disk_use_bytes(run.run_dir, _bytes(run.disk_limit_mb))
            ended = time.time()
            run.disk_check_due = ended + (ended - started) / DISK_CHECK_SHARE
        return measured

    def _check_ended(self, run):
        """Settles ``run`` if its wrapper process ended; returns whether it did."""
        if run.process is not None:
            # WNOWAIT leaves the ended wrapper a zombie, so its pid cannot be
            # reused while the run's leftovers get killed.
            try:
                ended = os.waitid(os.P_PID, run.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                ended = True
            if not ended:
                return False
            self._kill_leftovers(run)
            exit_code = run.process.wait()
        else:
            if _is_alive(run.wrapper):
                return False
            self._kill_leftovers(run)
            status = _read_status(run.run_dir) or {}
            exit_code = status.get("exit_code") if status.get("state") in ENDED_STATES else None
        run.exit_code, run.ended_at, run.kill_at = exit_code, time.time(), None
        del self._running[run.run_id]
        limit_message = self._limit_message(run)
        if run.stop_state:
            state, message = run.stop_state, run.stop_reason
        elif limit_message:
            state, message = FAILED, limit_message
        elif exit_code is None:
            state, message = FAILED, "the run ended while the server was down; its exit code is unknown"
        else:
            state, message = outcome(exit_code)
        if self.cgroups is not None:
            self.cgroups.remove(run.run_id)
        self._set_state(run, state, message)
        return True

    def _kill_leftovers(self, run):
        """SIGKILLs whatever of the run outlived its wrapper and waits until it is gone."""
        leftovers = _processes_below(run.wrapper)
        for process in leftovers:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(leftovers, timeout=2)
        if self.cgroups is not None:
            self.cgroups.kill(run.run_id)


def checked_run(run_dir, script_file, disk_limit_mb):
    """(absolute run folder, script path) of a run to start.

    Raises:
        ValueError: the folder or the script is missing, or the disk limit is not positive.
    """
    if disk_limit_mb is not None and disk_limit_mb <= 0:
        raise ValueError("disk_limit_mb must be positive or None, got %r" % (disk_limit_mb,))
    run_dir = os.path.abspath(run_dir)
    if not os.path.isdir(run_dir):
        raise ValueError("run_dir %r is not a folder" % run_dir)
    script_path = os.path.join(run_dir, script_file)
    if not os.path.isfile(script_path):
        raise ValueError("script_file %r does not exist in %r" % (script_file, run_dir))
    return run_dir, script_path


def wrapper_command(run_dir, script_path, sandbox, uid, disk_limit_mb, limits, cgroups=(),
                    node_cgroups=None):
    """The command line of the wrapper that runs a script (see ``_wrap``), for every runner.

    The wrapper writes status.json and output.txt into ``run_dir`` and gives the
    script the run environment only (``visualizer.sandbox.run_environment``), whatever
    environment the wrapper itself got.

    Args:
        run_dir: absolute path of the run folder.
        script_path: the script in it.
        sandbox: the ``visualizer.sandbox.Sandbox`` to run it in, or None.
        uid: the run's uid when the sandbox switches to one, else None.
        disk_limit_mb: the run folder's disk limit (it also bounds the private ``/tmp``).
        limits: {RLIMIT name: value} (see ``run_rlimits``).
        cgroups: ``cgroup.procs`` files the script joins (made by the runner).
        node_cgroups: {"storage_dir", "run_id", "memory_limit_mb", "max_processes"}: the
            wrapper makes the run's cgroups itself, on the machine it runs on (a cluster
            node), and names the limit the script ran into; None when the runner does.
    """
    program = [sys.executable, "-u", script_path]
    tmp_size_mb = min(disk_limit_mb or sandboxing.TMP_SIZE_MB, sandboxing.TMP_SIZE_MB)
    spec = {
        "command": sandbox.command(run_dir, program, uid, tmp_size_mb) if sandbox else program,
        "sandboxed": sandbox is not None,
        "environment": sandboxing.run_environment(run_dir),
        "cgroups": list(cgroups),
        "node_cgroups": node_cgroups,
        "limits": limits,
    }
    # -P: the wrapper's folder (visualizer/) must not shadow standard modules.
    return [sys.executable, "-P", WRAPPER_FILE, run_dir, json.dumps(spec)]


def run_rlimits(disk_limit_mb, max_processes, uid, pids_cgroup):
    """{RLIMIT name: value} for a run's processes.

    Args:
        disk_limit_mb: the run folder's disk limit (no file may be larger), or None.
        max_processes: the most processes and threads of the run, or None.
        uid: the run's own uid, or None when it runs as the server's.
        pids_cgroup: whether a pids cgroup counts the run's processes already.
    """
    limits = {"RLIMIT_NOFILE": MAX_OPEN_FILES, "RLIMIT_CORE": 0}
    if disk_limit_mb:
        limits["RLIMIT_FSIZE"] = _bytes(disk_limit_mb)
    if max_processes and not pids_cgroup:
        # RLIMIT_NPROC counts all processes of the real uid: a run's own uid
        # has none but the run's; the server's uid has the server's too.
        if uid is not None:
            limits["RLIMIT_NPROC"] = int(max_processes)
        elif os.geteuid() != 0:
            limits["RLIMIT_NPROC"] = _threads_of_uid(os.getuid()) + int(max_processes)
    return limits


def prepare_run_folder(run_dir, script_path, uid):
    """Gives the run folder to the run's uid (the folder itself only: what is inside may
    be a link) and lets it read its inputs; nothing when the run has no uid of its own."""
    if uid is not None:
        os.chown(run_dir, uid, uid, follow_symlinks=False)
        _make_inputs_readable(run_dir, script_path)


def cgroup_limit_message(cgroups, run_id, memory_limit_mb, max_processes):
    """Which limit of its cgroups (``visualizer.sandbox.Cgroups`` or None) run ``run_id``
    ran into, in words, or None."""
    if cgroups is None:
        return None
    if memory_limit_mb and cgroups.memory_limit_hit(run_id):
        return _memory_message(memory_limit_mb)
    if max_processes and cgroups.process_limit_hit(run_id):
        return _process_message(max_processes)
    return None


def _write_status(run_dir, state, exit_code=None, message=None):
    """status.json for the run; a full or broken disk must not stop the runner (the
    database still gets the state), so a failed write is only reported.

    ``storage.write_run_status`` writes a new file (``O_EXCL``) and renames it into
    place, so a link the script left there is replaced, never followed.
    """
    try:
        storage.write_run_status(run_dir, state, exit_code, message)
    except OSError as error:
        print("visualizer runner: could not write the status of %s: %s" % (run_dir, error),
              file=sys.stderr, flush=True)


def _read_status(run_dir):
    """status.json of a run folder the script controls: a regular file only, never a
    link or a pipe, at most STATUS_READ_LIMIT_BYTES, of the wrapper's form; else None."""
    try:
        fd = os.open(storage.status_path(run_dir), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return _checked_status(json.loads(os.read(fd, STATUS_READ_LIMIT_BYTES)))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _checked_status(status):
    """``status`` if it has the form the wrapper writes (the script may have written
    another), else None."""
    fields = {"state": (str,), "exit_code": (int, type(None)), "message": (str, type(None)),
              "time": (int, float)}
    if not (isinstance(status, dict) and status.get("state") in (QUEUED, RUNNING) + ENDED_STATES
            and all(isinstance(status.get(name), types) for name, types in fields.items())
            and not isinstance(status["exit_code"], bool)):
        return None
    return status


def _make_inputs_readable(run_dir, script_path):
    """Lets the run's own uid read its inputs: the script, ``images/`` and the images.

    The web app writes them as the server's user (``images/`` comes from mkdtemp,
    mode 0700). Only read permission is added, through file descriptors opened
    without following links: the folder is the script's, anything may be there.
    """
    run_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        _add_read_permission(run_fd, os.path.basename(script_path))
        images_fd = _open_no_follow(storage.IMAGES_DIR, run_fd)
        if images_fd is None:
            return
        try:
            if stat.S_ISDIR(os.fstat(images_fd).st_mode):
                os.fchmod(images_fd, stat.S_IMODE(os.fstat(images_fd).st_mode) | 0o555)
                for name in os.listdir(images_fd):
                    _add_read_permission(images_fd, name)
        finally:
            os.close(images_fd)
    finally:
        os.close(run_fd)


def _add_read_permission(dir_fd, name):
    """Read permission for all on the regular file ``name`` in ``dir_fd``; nothing for
    anything else."""
    fd = _open_no_follow(name, dir_fd)
    if fd is None:
        return
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            os.fchmod(fd, stat.S_IMODE(info.st_mode) | 0o444)
    finally:
        os.close(fd)


def _open_no_follow(name, dir_fd):
    """A read-only fd of ``name`` in ``dir_fd`` (never through a link, never blocking on a
    pipe), or None."""
    try:
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None


def _open_output(run_dir):
    """A new output.txt for the run, never following a link the script may have left there."""
    path = storage.output_path(run_dir)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                   0o644)


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


def _memory_message(limit_mb):
    return "memory limit of %g MB exceeded" % limit_mb


def _process_message(limit):
    return "process limit of %d exceeded" % limit


def _disk_message(limit_mb):
    return "disk limit of %g MB exceeded" % limit_mb


def _bytes(megabytes):
    return None if megabytes is None else int(megabytes * 2 ** 20)


def disk_use_bytes(folder, stop_above=None):
    """Disk space of everything under ``folder``, never following a link.

    Every file or folder counts at least one DISK_BLOCK_BYTES block (so a million
    empty files count too); a file with several links counts once. ``os.fwalk``
    opens each folder relative to its parent and checks it is the one listed, so a
    folder swapped for a link meanwhile is not entered.

    Args:
        folder: the run folder.
        stop_above: stop counting once the total is above this many bytes.
    """
    total, seen = 0, set()
    try:
        for _, dirs, files, dir_fd in os.fwalk(folder, follow_symlinks=False):
            for name in dirs + files:
                try:
                    info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except OSError:
                    continue
                if (info.st_dev, info.st_ino) in seen:
                    continue
                seen.add((info.st_dev, info.st_ino))
                total += max(info.st_blocks * 512, DISK_BLOCK_BYTES)
            if stop_above is not None and total > stop_above:
                break
    except OSError:
        pass
    return total


# --- processes ----------------------------------------------------------------

def _processes_below(wrapper, skipped_levels=0):
    """The live processes below the wrapper, leaving out the first ``skipped_levels``
    generations (the sandbox's own bwrap and its init are two)."""
    if wrapper is None or not _is_alive(wrapper):
        return []
    level = [wrapper]
    for _ in range(skipped_levels):
        level = [child for process in level for child in _children(process)]
    found = []
    for process in level:
        found += _children(process, recursive=True)
    return found


def _children(process, recursive=False):
    try:
        return process.children(recursive=recursive)
    except psutil.Error:
        return []


def _is_alive(process):
    """Whether ``process`` (a psutil.Process) is running and not a zombie; its pid reused is not."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _resident_bytes(processes):
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


def _thread_count(processes):
    total = 0
    for process in processes:
        try:
            total += process.num_threads()
        except psutil.Error:
            pass
    return total


def _threads_of_uid(uid):
    total = 0
    for process in psutil.process_iter(["uids", "num_threads"]):
        uids, threads = process.info["uids"], process.info["num_threads"]
        if uids is not None and uids.real == uid:
            total += threads or 1
    return total


def _wrapper_process(pid, run_dir):
    """The psutil process of the run's wrapper if ``pid`` is it, else None (pids get reused).

    A wrapper is this file run as a program for ``run_dir`` in this PID namespace (a
    sandboxed script, in a namespace of its own, cannot pass for one).
    """
    try:
        process = psutil.Process(pid)
        command = process.cmdline()
        same_namespace = os.readlink("/proc/%d/ns/pid" % pid) == os.readlink("/proc/self/ns/pid")
    except (psutil.Error, OSError):
        return None
    if same_namespace and command[2:4] == [WRAPPER_FILE, run_dir] and _is_alive(process):
        return process
    return None


def _find_wrapper(run_dir):
    """The psutil process of the live wrapper running in ``run_dir``, or None."""
    for process in psutil.process_iter(["cmdline"]):
        if (process.info["cmdline"] or [])[2:4] == [WRAPPER_FILE, run_dir]:
            found = _wrapper_process(process.pid, run_dir)
            if found:
                return found
    return None


def _has_started(run_dir):
    """Whether the run of ``run_dir`` got past 'queued'.

    The web app deletes status.json before it queues a run, and the runner writes
    'running' there before the process starts; so any later state means this run
    started, even if the database (updated a moment later) still calls it queued.
    """
    return (_read_status(run_dir) or {}).get("state") not in (None, QUEUED)


# --- the wrapper program --------------------------------------------------------

def _wrap(run_dir, spec):
    """Runs the run's command, records its exit code in status.json, ends the same way.

    Args:
        run_dir: the run folder.
        spec: {"command": argv, "sandboxed": bool, "environment": the command's
            environment, "cgroups": cgroup.procs files to join, "node_cgroups": cgroups
            to make here or None (see ``wrapper_command``), "limits": {RLIMIT name: value}}.

    A run that status.json already calls 'stopped' (stopped while a cluster still queued
    it) is not started. The wrapper's own output and the command's go to output.txt. The
    wrapper is the child subreaper of everything the command starts, so leftovers that
    escaped their process group are still its descendants and are killed when the
    command ends; its child dies with it. SIGTERM is ignored so that the wrapper
    outlives a stop long enough to record the outcome.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1)
    os.chdir(run_dir)
    if (_read_status(run_dir) or {}).get("state") == STOPPED:
        sys.exit(0)  # stopped while a cluster still had it queued: run nothing
    _write_status(run_dir, RUNNING)
    try:
        output = _open_output(run_dir)
    except OSError as error:
        _write_status(run_dir, FAILED, None, "could not open the output file: %s" % error)
        sys.exit(1)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        os.dup2(output, stream.fileno())
    os.close(output)
    cgroups, procs = None, list(spec["cgroups"])
    node = spec.get("node_cgroups")
    if node:
        cgroups = sandboxing.Cgroups.detect(node["storage_dir"])
        try:
            procs += cgroups.create(node["run_id"], _bytes(node["memory_limit_mb"]),
                                    node["max_processes"])
        except OSError as error:
            print("visualizer runner: no cgroups on this machine (%s)" % error, flush=True)
            cgroups = None

    wrapper_pid = os.getpid()

    def enter_limits():
        # The run must not outlive its wrapper (a kill while it was still starting).
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != wrapper_pid:
            os._exit(1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sandboxing.join_cgroups(procs)
        for name, value in spec["limits"].items():
            resource.setrlimit(getattr(resource, name), (value, value))

    try:
        child = subprocess.Popen(spec["command"], env=spec["environment"],
                                 stdin=subprocess.DEVNULL, preexec_fn=enter_limits)
    except OSError as error:
        print("visualizer runner: could not start the script: %s" % error, flush=True)
        _write_status(run_dir, FAILED, None, "could not start the script: %s" % error)
        sys.exit(1)
    exit_code = _wait_reaping(child.pid)
    if spec["sandboxed"] and exit_code > 128 and exit_code - 128 in signal.valid_signals():
        exit_code = 128 - exit_code  # bwrap reports a signal as 128 + its number
    leftovers = psutil.Process().children(recursive=True)
    for process in leftovers:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(leftovers, timeout=2)
    state, message = outcome(exit_code)
    if cgroups is not None:
        limit_message = cgroup_limit_message(cgroups, node["run_id"], node["memory_limit_mb"],
                                             node["max_processes"])
        if limit_message:
            state, message = FAILED, limit_message
        cgroups.remove(node["run_id"])
    _write_status(run_dir, state, exit_code, message)
    if exit_code < 0:  # end by the same signal, so the runner sees it too
        if -exit_code != signal.SIGKILL:
            signal.signal(-exit_code, signal.SIG_DFL)
        os.kill(os.getpid(), -exit_code)
    sys.exit(exit_code)


def _wait_reaping(pid):
    """Waits for child ``pid``, reaping the orphans a subreaper adopts meanwhile; its exit code."""
    while True:
        try:
            reaped, status = os.wait()
        except InterruptedError:
            continue
        if reaped == pid:
            return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    _wrap(sys.argv[1], json.loads(sys.argv[2]))
