"""`--workers N`: N processes serving one port, sharing one token, restarted when they die.

The parent only supervises: it starts N copies of the same command with `--workers 1` and the
port fixed, each binding it with SO_REUSEPORT so the kernel spreads connections among them. It
restarts a worker that exits unexpectedly, and on SIGTERM / SIGINT passes the signal on and waits
for them to drain. SIGHUP (reload) it passes on to every worker and does nothing else: each
worker reloads its own configuration, and the supervisor's settings (port, workers) are ones a
reload never changes.

The workers share one token: through Redis when a shared store is configured, otherwise through
a private directory the parent creates (WORKERS_DIRECTORY_ENV): a token file and an flock for
renewal (FileTokenStore). A file and a lock are enough on one host; the parent stays out
of the token's way and does no I/O of its own.
"""

from __future__ import annotations

import ctypes
import fcntl
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import FrameType
from typing import Final

import structlog
from prometheus_client.multiprocess import mark_process_dead

from proxy.config.settings import Settings
from proxy.server.metrics import MULTIPROCESS_ENV

# Set by the parent for its workers: the directory they share the token through, its pid, and
# which worker of how many each is ("2/4").
WORKERS_DIRECTORY_ENV: Final = "SOBOT_PROXY_WORKERS_DIRECTORY"
SUPERVISOR_PID_ENV: Final = "SOBOT_PROXY_SUPERVISOR_PID"
WORKER_ENV: Final = "SOBOT_PROXY_WORKER"
DIRECTORY_PREFIX: Final = "sobot-proxy-workers-"
SUPERVISOR_LOCK: Final = "supervisor.lock"
CHECK_INTERVAL: Final = 0.2
# A worker that dies soon after starting is restarted after a growing pause, so a worker that
# cannot start (a port taken, a bad environment) does not spin, nor fetch a token each time.
FIRST_RESTART_DELAY: Final = 0.5
MAX_RESTART_DELAY: Final = 30.0
HEALTHY_AFTER: Final = 10.0


def supervise(
    arguments: Sequence[str], settings: Settings, log: structlog.typing.FilteringBoundLogger
) -> int:
    """Run `settings.workers` workers until SIGTERM / SIGINT; the exit status."""
    port = settings.port or _free_port(settings.host)
    _remove_left_behind(log)
    directory = tempfile.mkdtemp(prefix=DIRECTORY_PREFIX)  # mode 0700: the token's home
    # Held while we live: a supervisor killed outright (no time to remove its directory) lets
    # go of it, and the next one to start removes what it left.
    alive = os.open(os.path.join(directory, SUPERVISOR_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(alive, fcntl.LOCK_EX)
    command = [
        sys.executable,
        "-m",
        "proxy",
        *arguments,
        "--workers",
        "1",
        "--port",
        str(port),
        # The budget is for the host's temporary directory, which the workers share: each
        # keeps its share.
        "--spool-limit",
        str(settings.spool_limit // settings.workers),
    ]
    # The workers count their metrics into files here, summed by whichever one is scraped.
    metrics_directory = os.path.join(directory, "metrics")
    os.mkdir(metrics_directory, 0o700)
    env = {
        **os.environ,
        WORKERS_DIRECTORY_ENV: directory,
        SUPERVISOR_PID_ENV: str(os.getpid()),
        MULTIPROCESS_ENV: metrics_directory,
    }

    def start(index: int) -> subprocess.Popen[bytes]:
        # Our own command again, with our own arguments: nothing untrusted is executed.
        worker_env = {**env, WORKER_ENV: f"{index + 1}/{settings.workers}"}
        # Born ignoring SIGHUP (kept through exec), until it sets its own handler: a reload
        # passed on while it is still starting must not end it. (No threads here: a
        # preexec_fn is safe.)
        return subprocess.Popen(  # noqa: S603
            command, env=worker_env, preexec_fn=_ignore_hangups
        )

    stopping = False
    reloads = 0

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    def reload(signum: int, _frame: FrameType | None) -> None:
        nonlocal reloads
        reloads += 1  # passed on by the loop below: a handler does no I/O

    # Before any worker starts: a SIGHUP's default action would end us, and our workers with us.
    signal.signal(signal.SIGHUP, reload)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workers = [start(index) for index in range(settings.workers)]
    started_at = [time.monotonic()] * settings.workers
    delays = [FIRST_RESTART_DELAY] * settings.workers
    restart_at: list[float | None] = [None] * settings.workers
    log.info(
        "workers_started",
        workers=settings.workers,
        port=port,
        pids=[w.pid for w in workers],
        supervisor_pid=os.getpid(),  # the one to send SIGHUP to: it passes it on
    )
    try:
        passed_on = 0
        while not stopping:
            if reloads != passed_on:
                passed_on = reloads
                _pass_on_reload(workers, log)
            now = time.monotonic()
            for index, worker in enumerate(workers):
                status = worker.poll()
                if status is None:
                    continue
                if restart_at[index] is None:
                    # Died young: wait longer each time; lived a while: restart at once.
                    lived = now - started_at[index]
                    delays[index] = (
                        FIRST_RESTART_DELAY
                        if lived > HEALTHY_AFTER
                        else min(delays[index] * 2, MAX_RESTART_DELAY)
                    )
                    restart_at[index] = now + (0 if lived > HEALTHY_AFTER else delays[index])
                    log.warning("worker_exited", pid=worker.pid, status=status)
                    # Its in-flight gauge is gone with it; its counters still count.
                    mark_process_dead(worker.pid, metrics_directory)  # type: ignore[no-untyped-call]
                if now >= (restart_at[index] or 0):
                    workers[index] = start(index)
                    started_at[index], restart_at[index] = now, None
                    log.warning(
                        "worker_restarted",
                        exited_pid=worker.pid,
                        status=status,
                        pid=workers[index].pid,
                    )
            time.sleep(CHECK_INTERVAL)
        log.info("stopping_workers", grace_s=settings.shutdown_grace)
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + settings.shutdown_grace + 5
        for worker in workers:
            try:
                worker.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        log.info("workers_stopped")
        return 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        os.close(alive)


def _ignore_hangups() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _pass_on_reload(
    workers: list[subprocess.Popen[bytes]], log: structlog.typing.FilteringBoundLogger
) -> None:
    """SIGHUP to every running worker. (One being restarted reads the configuration anew.)"""
    pids = []
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGHUP)
            pids.append(worker.pid)
    log.info("reload_forwarded", pids=pids)


def _remove_left_behind(log: structlog.typing.FilteringBoundLogger) -> None:
    """Remove this user's workers' directories whose supervisor is gone: they hold a token."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{DIRECTORY_PREFIX}*")):
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            lock = os.open(os.path.join(path, SUPERVISOR_LOCK), os.O_RDWR)
        except OSError:
            continue  # not ours, or its supervisor has not taken its lock yet
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its supervisor is alive
        finally:
            os.close(lock)
        shutil.rmtree(path, ignore_errors=True)
        log.info("workers_directory_removed", path=path, detail="left by a killed supervisor")


def die_with_the_supervisor() -> None:
    """In a worker: end when the supervisor does, even if it is killed without a word."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    # The supervisor may have gone before that took effect. (Compared with its pid, not with
    # 1: in a container the supervisor itself is often pid 1.)
    if str(os.getppid()) != os.environ.get(SUPERVISOR_PID_ENV):
        os.kill(os.getpid(), signal.SIGTERM)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port
