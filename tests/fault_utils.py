"""Real processes for the fault tests: launch ``tests/workers/fault_run.py`` (python or torchrun), watch its
``STEP n`` / ``SAVING n`` lines, send real signals, and read its final weights."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "workers", "fault_run.py")
# The torchrun recipe for restarts (issue 19): the elastic agent otherwise shares one TCPStore across restarts, and
# the restarted ranks can read the dead ranks' gloo addresses from it ("Connection refused", connectFullMesh timeout)
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def worker_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE]), **extra}


class Run:
    """A launched worker (or torchrun over workers) in its own process group; its output lines in a queue."""

    def __init__(self, out, *opts: str, nproc: int = 0, launch: tuple[str, ...] = (), env: dict | None = None):
        self.out = str(out)
        cmd = [sys.executable, WORKER, self.out, *opts]
        if nproc:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *launch,
                   *cmd[1:]]
        self.proc = subprocess.Popen(cmd, env=worker_env(**(env or {})), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, predicate, timeout: float = 300) -> str:
        """Read lines until one satisfies ``predicate``; return it (AssertionError on timeout or exit)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError("the run ended first:\n" + "\n".join(self.lines[-40:]))
            self.lines.append(line)
            if predicate(line):
                return line
        self.kill()
        raise AssertionError("timed out waiting:\n" + "\n".join(self.lines[-40:]))

    def finish(self, timeout: float = 300) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        while (line := self._queue.get()) is not None:
            self.lines.append(line)
        return self.proc.returncode

    def pid_of(self, rank: int = 0, restart: int = 0) -> int:
        """The pid of ``rank`` in the group of restart ``restart`` (waits for its pid file)."""
        path = os.path.join(self.out, f"pid-rank{rank}-restart{restart}")
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.1)
        with open(path) as f:
            return int(f.read())

    def signal(self, sig: int, rank: int | None = None, restart: int = 0) -> None:
        """``sig`` to one rank's process, or to the launched process (python worker or torchrun) itself."""
        os.kill(self.proc.pid if rank is None else self.pid_of(rank, restart), sig)

    def kill(self) -> None:
        """SIGKILL the whole process group (worker, or torchrun and its workers)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def text(self) -> str:
        return "\n".join(self.lines[-60:])


def run_to_end(out, *opts: str, timeout: float = 300, **kw) -> dict:
    run = Run(out, *opts, **kw)
    rc = run.finish(timeout)
    assert rc == 0 and "DONE" in run.lines, f"exit {rc}\n{run.text()}"
    return final_of(out)


def final_of(out) -> dict:
    return torch.load(os.path.join(str(out), "final.pt"), weights_only=False)


def same_weights(a: dict, b: dict) -> bool:
    return len(a["params"]) == len(b["params"]) and all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))


def step_of(line: str, word: str = "STEP") -> int | None:
    parts = line.split()
    if len(parts) >= 2 and parts[-2].endswith(word) and parts[-1].isdigit():
        return int(parts[-1])
    return None
