"""Processes, CPU pinning and /proc: what the scenarios need from the machine."""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
MIB: Final = 1024 * 1024
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
START_TIMEOUT: Final = 20.0  # a noisy shared machine can be slow to start a Python process
STOP_TIMEOUT: Final = 10.0
# What a started process may see of ours; never a SOBOT_* variable of the caller's.
KEPT_ENV: Final = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "PYTHONPATH")


class BenchError(Exception):
    """A benchmark that cannot run or whose run is not valid; the message says why."""


def require_tools(*names: str) -> dict[str, str]:
    """The full paths of `names`, or a BenchError naming those missing."""
    found = {name: shutil.which(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise BenchError(
            f"missing {', '.join(missing)}: run `bash scripts/bench`, which installs them "
            "(Debian packages nginx-light, wrk)"
        )
    return {name: path for name, path in found.items() if path is not None}


@dataclass(frozen=True, slots=True)
class Placement:
    """Which CPUs each role runs on; all None when unpinned.

    Pinned, the load generator and the upstream share one core and the proxy has the other
    to itself, so the proxy's figures are not shared with the machinery measuring it.
    """

    name: str
    load: str | None = None
    upstream: str | None = None
    proxy: str | None = None


def on_cpus(cpus: str | None, argv: Sequence[str]) -> list[str]:
    """`argv` run on `cpus` (taskset's list syntax), or wherever the kernel likes for None."""
    if cpus is None:
        return list(argv)
    taskset = shutil.which("taskset")
    if taskset is None:
        raise BenchError("taskset is missing (Debian package util-linux)")
    return [taskset, "-c", cpus, *argv]


UNPINNED: Final = Placement("unpinned")


def pinned_placement() -> Placement | None:
    """Load and upstream on CPU 0, the proxy on CPU 1; None where that cannot be done."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return None
    return Placement("pinned", load=str(cpus[0]), upstream=str(cpus[0]), proxy=str(cpus[1]))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class Checkout:
    """A sobot-proxy source tree and the interpreter that runs its `python -m proxy`."""

    root: Path
    python: Path


THIS_CHECKOUT: Final = Checkout(ROOT, Path(sys.executable))


def baseline_checkout(directory: Path) -> Checkout:
    """Another checkout of sobot-proxy to compare with, with its own `.venv`; BenchError if not."""
    root = directory.resolve()
    if not (root / "proxy").is_dir():
        raise BenchError(f"--baseline {directory}: no proxy/ there, not a sobot-proxy checkout")
    # Not resolved: a venv's python is a symlink, and only its own path finds the venv.
    python = root / ".venv" / "bin" / "python"
    if not os.access(python, os.X_OK):
        raise BenchError(
            f"--baseline {directory}: no .venv/bin/python there (make it: python3 -m venv "
            f"{root}/.venv && {root}/.venv/bin/pip install -e {root})"
        )
    return Checkout(root, python)


def child_env(**variables: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name in KEPT_ENV}
    return {**env, **variables}


class Process:
    """A started server: its own process group, its output appended to a file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.log_path = log_path
        # Append mode, so the file can be truncated between runs while the process writes.
        with open(log_path, "ab") as log:
            # Our own servers, started from fixed argument lists.
            self.popen = subprocess.Popen(  # noqa: S603
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else child_env(),
                cwd=cwd,
                start_new_session=True,  # stop() ends it with every process it started
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        status = self.popen.poll()
        if status is not None:
            raise BenchError(f"{self.name} exited with status {status}:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def truncate_log(self) -> None:
        """Empty the output file: JSON request lines add up over millions of requests."""
        with contextlib.suppress(OSError):
            os.truncate(self.log_path, 0)

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=STOP_TIMEOUT)
        # Whatever is left of the group (nginx workers, proxy workers) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=STOP_TIMEOUT)


def python_module(module: str, *args: str, python: Path | None = None) -> list[str]:
    """The command running `python -m module` with `python`, by default this interpreter."""
    return [str(python or sys.executable), "-m", module, *args]


# --- HTTP, small and dependency-free -------------------------------------------------------


def http_call(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, headers=dict(headers or {}))
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_for_status(
    process: Process,
    port: int,
    path: str,
    *,
    status: int = 200,
    timeout: float = START_TIMEOUT,
    poll: float = 0.05,
) -> None:
    """Poll `path` until it answers `status`; BenchError (with the server's output) if not."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        process.check_alive()
        try:
            got, body = http_call(port, path, timeout=2.0)
        except OSError as exc:
            last = str(exc)
        else:
            if got == status:
                return
            last = f"HTTP {got}: {body[:200]!r}"
        time.sleep(poll)
    raise BenchError(
        f"{process.name}: {path} not {status} within {timeout} s ({last})\n{process.tail()}"
    )


# --- /proc ----------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it (nginx workers, proxy workers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def cpu_seconds(pid: int, *, tree: bool = False) -> float:
    """User + system CPU time of `pid` (and, with `tree`, of its descendants) so far."""
    total = 0
    for each in _descendants(pid) if tree else [pid]:
        try:
            with open(f"/proc/{each}/stat") as stat:
                # Fields after the command name, which may itself hold spaces and parentheses.
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return total / CLOCK_TICKS


def finished_children_cpu() -> float:
    """User + system CPU time of the children this process has waited for (each wrk run)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + children.ru_stime


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {field} for process {pid}")


def rss_bytes(pid: int) -> int:
    return _status_kib(pid, "VmRSS") * 1024


class PeakRss:
    """The peak resident memory of a process over a `with` block.

    The kernel's own high-water mark (VmHWM), reset on entry through clear_refs, catches
    peaks between samples; where the reset is refused, sampling every 5 ms stands in.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.sampled = rss_bytes(pid)
        self.peak = self.sampled
        self._kernel = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            with contextlib.suppress(OSError, BenchError):
                self.sampled = max(self.sampled, rss_bytes(self.pid))

    def __enter__(self) -> PeakRss:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as clear:
                clear.write("5")  # 5: reset the peak RSS (Linux >= 4.0)
            self._kernel = True
        except OSError:
            self._kernel = False
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        kernel = _status_kib(self.pid, "VmHWM") * 1024 if self._kernel else 0
        self.peak = max(self.sampled, kernel)


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """The machine's CPU time so far, and the part of it spent by us (this process, the
    servers it started, and the finished children it waited for, such as each wrk run)."""

    at: float
    busy: float  # user, nice, system, irq and softirq time of every CPU
    steal: float  # time the hypervisor gave our virtual CPUs to someone else
    idle: float  # idle and iowait time of every CPU
    ours: float

    @classmethod
    def take(cls) -> CpuSnapshot:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        user, nice, system = fields[0], fields[1], fields[2]
        # Interrupt time too: loopback traffic is handled in softirq, which the kernel may
        # charge to the processes involved (in their stime) or here.
        irq, softirq = fields[5], fields[6]
        steal = fields[7] if len(fields) > 7 else 0
        return cls(
            at=time.monotonic(),
            busy=(user + nice + system + irq + softirq) / CLOCK_TICKS,
            steal=steal / CLOCK_TICKS,
            idle=(fields[3] + fields[4]) / CLOCK_TICKS,
            ours=cpu_seconds(os.getpid(), tree=True) + finished_children_cpu(),
        )

    def idle_since(self, before: CpuSnapshot) -> float:
        """Cores the whole machine left idle, on average since `before`."""
        return (self.idle - before.idle) / max(self.at - before.at, 1e-9)

    def others_since(self, before: CpuSnapshot) -> tuple[float, float]:
        """Cores kept busy by other processes, and cores stolen, on average since `before`.

        The machine is shared: this says how much of the noise in a run came from elsewhere.
        """
        wall = max(self.at - before.at, 1e-9)
        others = (self.busy - before.busy) - (self.ours - before.ours)
        return max(others, 0.0) / wall, (self.steal - before.steal) / wall
