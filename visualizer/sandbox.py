"""The sandbox around a run: a bubblewrap command line, its environment, and cgroups.

A sandboxed script sees a read-only system (``/usr`` and a few files of ``/etc``),
the interpreter and virtual environment of the server (``sys.base_prefix``,
``sys.prefix``) and the callback library, read-only; its own run folder
read-write; a private ``/tmp`` and ``/dev/shm`` of bounded size. Nothing else of
the machine: not the instance folder (database, secret key), not the storage of
other users, not the rest of the repository, not the server's environment or
processes. It has its own PID, IPC, UTS, cgroup and (unless ``network``) network
namespaces, and runs as an unprivileged uid: when the server is root, ``setpriv``
switches to the run's own uid (``run_uid``) with no capabilities and no way to
gain any; otherwise bubblewrap's user namespace maps the server's uid.

``Cgroups`` puts a run into memory and pids cgroups where the machine has them
(cgroup v1 hierarchies or the v2 unified one), so that every process the run
starts, escaped from its process group or not, is counted, limited and killed.
"""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from custom_keras import storage

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY_DIR = os.path.join(REPOSITORY_ROOT, "custom_keras")
BWRAP = "bwrap"
SETPRIV = "setpriv"
# The few files of /etc that programs need (dynamic linker, time zone, certificates, MIME
# types); never passwd, shadow, or anything that names the machine's users.
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone",
             "alternatives", "ssl", "ca-certificates", "mime.types", "nsswitch.conf", "hosts")
ETC_NETWORK_FILES = ("resolv.conf", "host.conf", "gai.conf")
TOP_LEVEL_SYSTEM_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
TMP_SIZE_MB = 512
SHM_SIZE_MB = 256
# Runs as root get uids RUN_UID_BASE .. RUN_UID_BASE + RUN_UID_RANGE - 1: far above the
# users and subordinate-uid ranges of an ordinary machine.
RUN_UID_BASE = 1_500_000_000
RUN_UID_RANGE = 1_000_000
# Passed on from the server's environment when set; everything else is built here.
TF_LOG_LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"
RUN_TF_LOG_LEVEL = "2"  # errors only
PASSED_ENVIRONMENT = ("LANG", "LC_ALL", "TZ", TF_LOG_LEVEL_ENV)
CHECK_TIMEOUT_S = 30
OFF_MESSAGE = ("Runs are NOT sandboxed (VISUALIZER_SANDBOX=off): every script can read and "
               "change everything this server can. Use this only on a machine of your own.")


class SandboxUnavailable(Exception):
    """The sandbox cannot be had here; the message says why and what to do."""


def instance_name(storage_dir):
    """A short name for one server installation (its storage folder), for its cgroups and uids."""
    return "visualizer-" + hashlib.sha256(os.path.abspath(storage_dir).encode()).hexdigest()[:10]


def run_uid(storage_dir, run_id):
    """The unprivileged uid of run ``run_id`` of the installation at ``storage_dir`` (a server
    running as root switches to it).

    Runs of one installation get different uids (per-uid limits are per run); the
    installation's own offset keeps two servers on one machine apart.
    """
    offset = int(instance_name(storage_dir).rsplit("-", 1)[1], 16)
    return RUN_UID_BASE + (offset + int(run_id)) % RUN_UID_RANGE


def run_environment(run_dir, environ=None):
    """The environment of a run, built from an allow-list, never copied from the server's.

    Args:
        run_dir: the run folder (``VISUALIZER_RUN_DIR``).
        environ: the server's environment, read only for ``PASSED_ENVIRONMENT``;
            ``os.environ`` when None.
    """
    environ = os.environ if environ is None else environ
    env = {name: environ[name] for name in PASSED_ENVIRONMENT if environ.get(name)}
    env.setdefault("LANG", "C.UTF-8")
    # TensorFlow's C++ INFO and WARNING lines (cpu_feature_guard ...) off, so the Output tab
    # starts nearer the script's own lines; the server's setting passes, a script's wins.
    # (TensorFlow 2.21 still prints its oneDNN notice before absl logging is set up.)
    env.setdefault(TF_LOG_LEVEL_ENV, RUN_TF_LOG_LEVEL)
    env.update({
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin",
                                 "/bin"]),
        "HOME": "/tmp",
        "PYTHONUNBUFFERED": "1",
        storage.RUN_DIR_ENV: run_dir,
    })
    return env


class Sandbox:
    """Builds the bubblewrap command line that runs a program in a run folder.

    Args:
        storage_dir: the installation's storage folder (it sets the runs' uids apart
            from another installation's on the same machine).
        network: whether the run may use the network (no network namespace of its own).
        as_root: whether the server runs as root, so the program is switched to an
            unprivileged uid with ``setpriv``; None: whether this process is root.
    """

    def __init__(self, storage_dir, network=False, as_root=None):
        self.storage_dir = storage_dir
        self.network = network
        self.as_root = os.geteuid() == 0 if as_root is None else as_root

    def run_uid(self, run_id):
        """The uid run ``run_id`` runs as (see ``run_uid``), or None when the server is not root."""
        return run_uid(self.storage_dir, run_id) if self.as_root else None

    def command(self, run_dir, argv, uid=None, tmp_size_mb=TMP_SIZE_MB):
        """The command line that runs ``argv`` sandboxed, with ``run_dir`` as working directory.

        Args:
            run_dir: absolute path of the run folder, the one writable folder.
            argv: the program and its arguments, as seen inside the sandbox.
            uid: the uid to run as when the server is root (see ``run_uid``).
            tmp_size_mb: size of the private ``/tmp``.
        """
        options = [BWRAP]
        for name in TOP_LEVEL_SYSTEM_DIRS:
            path = "/" + name
            if os.path.islink(path):
                options += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                options += ["--ro-bind", path, path]
        options += ["--ro-bind", "/usr", "/usr"]
        etc = ETC_FILES + (ETC_NETWORK_FILES if self.network else ())
        options += ["--perms", "0755", "--dir", "/etc"]
        for name in etc:
            options += ["--ro-bind-try", "/etc/" + name, "/etc/" + name]
        options += ["--proc", "/proc", "--dev", "/dev",
                    "--size", str(SHM_SIZE_MB * 2 ** 20), "--perms", "1777", "--tmpfs", "/dev/shm",
                    "--size", str(int(tmp_size_mb * 2 ** 20)), "--perms", "1777", "--tmpfs", "/tmp"]
        # bwrap makes missing parent folders with mode 0700, closed to an unprivileged
        # uid: make them 0755 first (empty folders, nothing of the host's).
        made = {"/", "/usr", "/tmp", "/dev", "/proc", "/etc"}
        for source, writable in self._binds(run_dir):
            parents = []
            parent = os.path.dirname(source)
            while parent not in made and not _under_any(parent, self._read_only_trees()):
                parents.append(parent)
                parent = os.path.dirname(parent)
            for folder in reversed(parents):
                options += ["--perms", "0755", "--dir", folder]
                made.add(folder)
            options += ["--bind" if writable else "--ro-bind", source, source]
            made.add(source)
        options += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                    "--hostname", "sandbox", "--die-with-parent", "--new-session",
                    "--chdir", run_dir]
        if not self.network:
            options.append("--unshare-net")
        if self.as_root:
            if uid is None:
                raise ValueError("a server running as root must give the run's uid")
            options += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--",
                        SETPRIV, "--reuid=%d" % uid, "--regid=%d" % uid, "--clear-groups",
                        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
        return options + ["--"] + list(argv)

    def _read_only_trees(self):
        return ["/usr"] + [p for p, _ in self._interpreter_binds()]

    @staticmethod
    def _interpreter_binds():
        trees = []
        for path in (sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable)),
                     LIBRARY_DIR):
            path = os.path.realpath(path)
            if not _under_any(path, ["/usr"] + trees):
                trees.append(path)
        return [(path, False) for path in sorted(trees)]

    def _binds(self, run_dir):
        return self._interpreter_binds() + [(run_dir, True)]

    def check(self):
        """Starts a trivial sandbox as a run would get it.

        Raises:
            SandboxUnavailable: bubblewrap is missing, or the kernel refused the
                namespaces; the message says what to do.
        """
        needed = [BWRAP] + ([SETPRIV] if self.as_root else [])
        missing = [program for program in needed if not shutil.which(program)]
        if missing:
            raise SandboxUnavailable("%s not found; install Debian's bubblewrap (scripts/setup.sh "
                                     "does when it may)" % " and ".join(missing))
        run_dir = tempfile.mkdtemp(prefix="visualizer-sandbox-check-")
        try:
            uid = RUN_UID_BASE + RUN_UID_RANGE if self.as_root else None
            if uid is not None:
                os.chown(run_dir, uid, uid, follow_symlinks=False)
            probe = "import os; open('probe', 'w').write(str(os.getuid()))"
            try:
                result = subprocess.run(
                    self.command(run_dir, [sys.executable, "-I", "-c", probe], uid, tmp_size_mb=1),
                    env=run_environment(run_dir), stdin=subprocess.DEVNULL, capture_output=True,
                    timeout=CHECK_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as error:
                raise SandboxUnavailable("a trivial sandbox did not start: %s" % error) from None
            if result.returncode != 0 or not os.path.isfile(os.path.join(run_dir, "probe")):
                raise SandboxUnavailable(
                    "a trivial sandbox failed (exit code %d): %s" % (
                        result.returncode,
                        result.stderr.decode(errors="replace").strip()[-500:] or "no message"))
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)


def _under_any(path, trees):
    return any(path == tree or path.startswith(tree.rstrip("/") + "/") for tree in trees)


# --- cgroups -------------------------------------------------------------------

MEMORY, PIDS = "memory", "pids"


class Cgroups:
    """The memory and pids cgroups of one installation's runs.

    ``Cgroups.detect`` finds the hierarchies this process may write (cgroup v1
    ``memory`` and ``pids``, or the v2 unified hierarchy with those controllers)
    and makes one folder for the installation inside this process's own cgroup,
    ``visualizer-<hash>``; each run gets ``run-<id>`` below it. Two servers on one
    machine (another storage folder) never share a folder.

    Args:
        parents: {controller: (version, folder of the installation)}; a controller
            missing from it is not available.
    """

    def __init__(self, parents):
        self.parents = parents

    @classmethod
    def detect(cls, storage_dir):
        """The writable cgroups of this machine for the installation at ``storage_dir``."""
        name = instance_name(storage_dir)
        own = _own_cgroups()
        parents = {}
        for mount_point, version, options in _cgroup_mounts():
            for controller in (MEMORY, PIDS):
                if controller in parents:
                    continue
                if version == 1 and controller in options:
                    folder = os.path.join(mount_point, own.get(controller, "/").lstrip("/"), name)
                elif version == 2 and _v2_has(mount_point, own.get("", "/"), controller):
                    folder = os.path.join(mount_point, own.get("", "/").lstrip("/"), name)
                else:
                    continue
                try:
                    os.makedirs(folder, exist_ok=True)
                    if version == 2:  # the controller must be on for the folder and below it
                        _write_try(os.path.join(os.path.dirname(folder), "cgroup.subtree_control"),
                                   "+" + controller)
                        _write(os.path.join(folder, "cgroup.subtree_control"), "+" + controller)
                except OSError:
                    continue
                parents[controller] = (version, folder)
        return cls(parents)

    def has(self, controller):
        return controller in self.parents

    def folders(self, run_id):
        """{controller: (version, folder)} of run ``run_id``'s cgroups."""
        return {controller: (version, os.path.join(parent, "run-%d" % int(run_id)))
                for controller, (version, parent) in self.parents.items()}

    def create(self, run_id, memory_limit_bytes=None, max_processes=None):
        """Makes run ``run_id``'s cgroups with their limits; returns their ``cgroup.procs`` files.

        Raises:
            OSError: a cgroup could not be made.
        """
        procs = []
        for controller, (version, folder) in self.folders(run_id).items():
            os.makedirs(folder, exist_ok=True)
            if controller == MEMORY and memory_limit_bytes:
                limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
                _write(os.path.join(folder, limit_file), str(int(memory_limit_bytes)))
                if version == 2:
                    _write_try(os.path.join(folder, "memory.swap.max"), "0")
                    _write_try(os.path.join(folder, "memory.oom.group"), "1")
            if controller == PIDS and max_processes:
                _write(os.path.join(folder, "pids.max"), str(int(max_processes)))
            procs.append(os.path.join(folder, "cgroup.procs"))
        return sorted(set(procs))

    def pids(self, run_id):
        """Pids of every process in run ``run_id``'s cgroups."""
        found = set()
        for version, folder in self.folders(run_id).values():
            try:
                with open(os.path.join(folder, "cgroup.procs")) as f:
                    found.update(int(line) for line in f if line.strip())
            except (FileNotFoundError, ValueError):
                pass
        return found

    def memory_limit_hit(self, run_id):
        """Whether the kernel killed a process of the run for the memory limit."""
        version, folder = self.folders(run_id).get(MEMORY, (None, None))
        if folder is None:
            return False
        name = "memory.oom_control" if version == 1 else "memory.events"
        return _counter(os.path.join(folder, name), "oom_kill") > 0

    def process_limit_hit(self, run_id):
        """Whether the run tried to start more processes than its pids limit allows."""
        version, folder = self.folders(run_id).get(PIDS, (None, None))
        return folder is not None and _counter(os.path.join(folder, "pids.events"), "max") > 0

    def kill(self, run_id, timeout_s=5):
        """SIGKILLs every process of the run until none is left (or ``timeout_s`` passed)."""
        deadline = time.time() + timeout_s
        for version, folder in self.folders(run_id).values():
            if version == 2:
                _write_try(os.path.join(folder, "cgroup.kill"), "1")
        while True:
            pids = self.pids(run_id)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not pids or time.time() > deadline:
                return not pids
            time.sleep(0.01)

    def close(self):
        """Removes the installation's cgroup folders once no run is left in them."""
        for _, folder in self.parents.values():
            try:
                os.rmdir(folder)
            except OSError:
                pass

    def remove(self, run_id):
        """Kills what is left of the run and removes its cgroups."""
        self.kill(run_id)
        for _, folder in self.folders(run_id).values():
            deadline = time.time() + 2
            while True:
                try:
                    os.rmdir(folder)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY while killed processes are still exiting
                    if time.time() > deadline:
                        break
                    time.sleep(0.01)


def join_cgroups(procs_files):
    """Moves the calling process into the cgroups (its children follow); for ``preexec_fn``."""
    for path in procs_files:
        _write(path, "0")


def _cgroup_mounts():
    """(mount point, 1 or 2, super options) of each cgroup file system, from mountinfo."""
    mounts = []
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return mounts
    for line in lines:
        fields = line.split()
        try:
            separator = fields.index("-")
        except ValueError:
            continue
        fstype, super_options = fields[separator + 1], fields[separator + 3].split(",")
        if fstype == "cgroup":
            mounts.append((fields[4], 1, super_options))
        elif fstype == "cgroup2":
            mounts.append((fields[4], 2, super_options))
    return mounts


def _own_cgroups():
    """{controller: path} of this process's cgroups; '' is the v2 unified path."""
    own = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for controller in controllers.split(",") if controllers else [""]:
                    own[controller] = path
    except (OSError, ValueError):
        pass
    return own


def _v2_has(mount_point, own_path, controller):
    try:
        with open(os.path.join(mount_point, own_path.lstrip("/"), "cgroup.controllers")) as f:
            return controller in f.read().split()
    except OSError:
        return False


def _counter(path, key):
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _write_try(path, text):
    try:
        _write(path, text)
    except OSError:
        pass
