"""A local Ray head for the tests: token authentication on, bound to 127.0.0.1 where Ray lets it.

``RayHead.start`` runs ``ray start --head`` with a temp folder of its own, free
ports and a fresh token; ``RayHead.stop`` ends only the processes of this head
(found by that temp folder and GCS port, and their children), never another
Ray on the machine, as ``ray stop`` would.
"""
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import psutil

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 20


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RayHead:
    """One single-node Ray cluster.

    Args:
        num_cpus: the CPUs the head offers to jobs.
    """

    def __init__(self, num_cpus=2):
        self.num_cpus = num_cpus
        self.token = secrets.token_hex(32)
        # Short: Ray's socket paths under it must stay below the 107-character limit.
        self.temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.address = "http://127.0.0.1:%d" % self.dashboard_port

    @property
    def client_env(self):
        """The environment a client of this head needs (the token included)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def start(self):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("RAY_")}  # no other cluster's address or token
        env.update(self.client_env, RAY_USAGE_STATS_ENABLED="0")
        command = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1",
                   "--port", str(self.port), "--dashboard-host", "127.0.0.1",
                   "--dashboard-port", str(self.dashboard_port), "--num-cpus", str(self.num_cpus),
                   "--num-gpus", "0", "--include-dashboard", "true", "--disable-usage-stats",
                   # Ray's fixed default ports would clash with another head on this machine.
                   "--dashboard-agent-listen-port", str(_free_port()),
                   "--ray-client-server-port", str(_free_port()),
                   "--temp-dir", self.temp_dir]
        try:
            result = subprocess.run(command, env=env, stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True, timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        if result.returncode != 0:
            self.stop()
            raise RuntimeError("ray start failed:\n%s%s" % (result.stdout[-3000:],
                                                             result.stderr[-3000:]))
        try:
            self._wait_until_jobs_run(env)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_jobs_run(self, env):
        """Ray answers before its job agent is ready: wait until a trivial job has run."""
        probe = ("import time; from ray.job_submission import JobSubmissionClient as C\n"
                 "c = C(%r)\n"
                 "while True:\n"
                 "    try:\n"
                 "        job = c.submit_job(entrypoint='true'); break\n"
                 "    except RuntimeError:\n"
                 "        time.sleep(0.5)\n"
                 "while not c.get_job_status(job).is_terminal():\n"
                 "    time.sleep(0.2)\n" % self.address)
        subprocess.run([sys.executable, "-c", probe], env=env, check=True,
                       stdin=subprocess.DEVNULL, timeout=START_TIMEOUT_S)

    def processes(self):
        """The live processes of this head: those naming its temp folder or GCS port, and below."""
        port_suffix = ":%d" % self.port
        own = []
        for process in psutil.process_iter(["cmdline"]):
            arguments = process.info["cmdline"] or []
            if any(self.temp_dir in argument or argument.endswith(port_suffix)
                   for argument in arguments):
                own.append(process)
        found = {process.pid: process for process in own}
        for process in own:
            try:
                found.update((child.pid, child) for child in process.children(recursive=True))
            except psutil.Error:
                pass
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self):
        """Ends this head's processes (SIGTERM, then SIGKILL) and removes its temp folder."""
        processes = self.processes()
        for process in processes:
            try:
                process.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(processes, timeout=STOP_TIMEOUT_S / 2)
        for process in alive + self.processes():
            try:
                process.kill()
            except psutil.Error:
                pass
        deadline = time.time() + STOP_TIMEOUT_S / 2
        while self.processes() and time.time() < deadline:
            time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
