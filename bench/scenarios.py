"""What is measured. Each scenario starts its own servers, returns plain data, and stops them.

throughput   direct / nginx proxy / sobot-proxy (/ a baseline checkout of it) at several
             concurrencies, on one placement
memory       idle RSS, and peak RSS while relaying a big download and a big upload
real_client  new connection per call: to a TLS upstream ~20 ms away, versus through the proxy
workers      --workers 2 versus 1, unpinned
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import ssl
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench.load import run_wrk
from bench.system import (
    MIB,
    THIS_CHECKOUT,
    UNPINNED,
    BenchError,
    Checkout,
    CpuSnapshot,
    PeakRss,
    Placement,
    Process,
    cpu_seconds,
    finished_children_cpu,
    free_port,
    http_call,
    python_module,
    rss_bytes,
)
from bench.upstreams import (
    API_PATH,
    TOKEN,
    Server,
    make_tls_files,
    start_fake_sobot,
    start_nginx_proxy,
    start_sobot_proxy,
    start_upstream,
)
from proxy.testing.fake_sobot import FAULT_HEADER

DIRECT: Final = "direct"
NGINX: Final = "nginx proxy"
SOBOT: Final = "sobot-proxy"
BASELINE: Final = "sobot-proxy baseline"  # another checkout's, with --baseline


@dataclass(frozen=True, slots=True)
class Target:
    """One way to reach the upstream under load, and the process whose CPU it costs."""

    name: str
    port: int
    headers: dict[str, str]
    measured_pid: int | None  # None: nothing between the load generator and the upstream

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{API_PATH}"


def measure(
    target: Target,
    *,
    connections: int,
    seconds: float,
    script: Path,
    cpus: str | None,
    upstream_pid: int | None = None,
) -> dict[str, Any]:
    """One wrk run against `target`, with the CPU its proxy process(es) spent on it and, given
    the upstream's pid, what wrk and the upstream spent beside it."""
    before = cpu_seconds(target.measured_pid, tree=True) if target.measured_pid else 0.0
    upstream_before = cpu_seconds(upstream_pid, tree=True) if upstream_pid else 0.0
    wrk_before = finished_children_cpu()
    machine = CpuSnapshot.take()
    result = run_wrk(
        target.url,
        connections=connections,
        seconds=seconds,
        script=script,
        cpus=cpus,
        headers=target.headers,
    )
    after = CpuSnapshot.take()
    others, steal = after.others_since(machine)
    record = result.as_dict()
    record["other_load_cores"], record["steal_cores"] = others, steal
    record["machine_idle_cores"] = after.idle_since(machine)
    if target.measured_pid is not None:
        spent = cpu_seconds(target.measured_pid, tree=True) - before
        record["cpu_us_per_request"] = spent / result.requests * 1e6 if result.requests else None
    if upstream_pid is not None:
        # wrk is a finished child by now: its CPU is in our children's rusage.
        beside = finished_children_cpu() - wrk_before
        beside += cpu_seconds(upstream_pid, tree=True) - upstream_before
        record["load_cpu_us_per_request"] = (
            beside / result.requests * 1e6 if result.requests else None
        )
    return record


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values measured (None: none was)."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _median(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    return median(run.get(key) for run in runs)


def summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure across repeats, with the error counts summed."""
    return {
        "requests_per_s": _median(runs, "requests_per_s"),
        "p50_us": _median(runs, "p50_us"),
        "p99_us": _median(runs, "p99_us"),
        "cpu_us_per_request": _median(runs, "cpu_us_per_request"),
        "machine_idle_cores": _median(runs, "machine_idle_cores"),
        "load_cpu_us_per_request": _median(runs, "load_cpu_us_per_request"),
        "other_load_cores": _median(runs, "other_load_cores"),
        "steal_cores": _median(runs, "steal_cores"),
        "requests": sum(run["requests"] for run in runs),
        "errors": sum(run["non_2xx"] + run["socket_errors"] + run["timeouts"] for run in runs),
        "runs": [
            {k: round(v, 2) if isinstance(v, float) else v for k, v in run.items()} for run in runs
        ],
    }


def warm_up_targets(
    targets: Sequence[Target], *, seconds: float, script: Path, cpus: str | None
) -> None:
    """First requests pay for imports, connections and caches: not what is measured."""
    for target in targets:
        for _ in range(20):
            status, _body = http_call(target.port, API_PATH, headers=target.headers)
            if status != 200:
                raise BenchError(f"{target.name}: warm-up request answered {status}")
        if seconds > 0:
            run_wrk(
                target.url,
                connections=16,
                seconds=seconds,
                script=script,
                cpus=cpus,
                headers=target.headers,
            )


def throughput(
    directory: Path,
    placement: Placement,
    *,
    concurrencies: Sequence[int],
    seconds: float,
    repeats: int,
    warm_up: float,
    script: Path,
    baseline: Checkout | None = None,
) -> dict[str, Any]:
    """Direct, the nginx anchor and sobot-proxy, on one placement, interleaved; with
    `baseline`, that checkout's sobot-proxy too, placed and measured as this one is.

    All run at once (an idle server costs nothing) and each repeat runs every setup at
    every concurrency before the next repeat starts, so a burst of noise from the machine's
    neighbours lands on all of them alike instead of on one setup's figures.
    """
    with ExitStack() as servers:
        upstream = started(
            servers, start_upstream(directory / "upstream", free_port(), cpus=placement.upstream)
        )
        nginx = started(
            servers,
            start_nginx_proxy(
                directory / "nginx-proxy", free_port(), upstream.port, cpus=placement.proxy
            ),
        )
        checkouts = {SOBOT: THIS_CHECKOUT} | ({BASELINE: baseline} if baseline else {})
        proxies = {
            setup: started(
                servers,
                start_sobot_proxy(
                    directory / setup.replace(" ", "-"),
                    free_port(),
                    f"http://127.0.0.1:{upstream.port}",
                    cpus=placement.proxy,
                    name=setup.replace(" ", "-"),
                    checkout=checkout,
                ),
            )
            for setup, checkout in checkouts.items()
        }
        targets = [
            Target(DIRECT, upstream.port, {"token": TOKEN}, None),
            Target(NGINX, nginx.port, {}, nginx.pid),
            *(Target(setup, proxy.port, {}, proxy.pid) for setup, proxy in proxies.items()),
        ]
        warm_up_targets(targets, seconds=warm_up, script=script, cpus=placement.load)
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for _repeat in range(repeats):
            for connections in concurrencies:
                for target in targets:
                    truncate((upstream, nginx, *proxies.values()))
                    runs.setdefault((target.name, connections), []).append(
                        measure(
                            target,
                            connections=connections,
                            seconds=seconds,
                            script=script,
                            cpus=placement.load,
                        )
                    )
        rss_after = rss_bytes(proxies[SOBOT].pid)
    results: dict[str, Any] = {}
    for connections in concurrencies:
        row = {t.name: summary(runs[(t.name, connections)]) for t in targets}
        direct, anchor = row[DIRECT], row[NGINX]
        for name, figures in row.items():
            if name == DIRECT:
                continue
            figures["added_p50_us"] = figures["p50_us"] - direct["p50_us"]
            figures["added_p99_us"] = figures["p99_us"] - direct["p99_us"]
            figures["throughput_vs_nginx"] = figures["requests_per_s"] / anchor["requests_per_s"]
        results[str(connections)] = row
    measured: dict[str, Any] = {
        "placement": {
            "load_generator_cpus": placement.load,
            "upstream_cpus": placement.upstream,
            "proxy_cpus": placement.proxy,
        },
        "sobot_proxy_rss_after_mib": rss_after / MIB,
        "concurrency": results,
    }
    if baseline is not None:
        measured["after_vs_baseline"] = {
            connections: {
                key: ratio(row[SOBOT][key], row[BASELINE][key])
                for key in ("requests_per_s", "cpu_us_per_request")
            }
            for connections, row in results.items()
        }
    return measured


def ratio(after: float | None, before: float | None) -> float | None:
    return after / before if after is not None and before else None


def started(stack: ExitStack, server: Server) -> Server:
    stack.callback(server.stop)
    return server


def truncate(servers: Sequence[Server]) -> None:
    for server in servers:
        process = server.process
        process.truncate_log()
        log = process.log_path.parent / "access.log"
        if log.exists():
            log.write_bytes(b"")


# --- memory ----------------------------------------------------------------------------------


def _pattern(size: int) -> Iterator[bytes]:
    block = hashlib.sha256(b"upload").digest() * 2048  # 64 KiB
    for start in range(0, size, len(block)):
        yield block[: min(len(block), size - start)]


def _download(port: int, size: int) -> int:
    """GET `size` bytes from the fake through the proxy, read and dropped: the bytes received."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", "/api/file", headers={FAULT_HEADER: f"download={size}"})
        response = connection.getresponse()
        if response.status != 200:
            raise BenchError(f"download answered {response.status}")
        received = 0
        while chunk := response.read(MIB):
            received += len(chunk)
        return received
    finally:
        connection.close()


def _upload(port: int, size: int) -> int:
    """POST `size` bytes through the proxy: the body size the fake says it received."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(
            "POST",
            "/api/5/file/upload",
            body=_pattern(size),
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        )
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise BenchError(f"upload answered {response.status}: {body[:200]!r}")
        received: int = json.loads(body)["item"]["body_size"]
        return received
    finally:
        connection.close()


def _relay_measured(
    pid: int, transfer: Callable[[int, int], int], port: int, size: int
) -> dict[str, Any]:
    baseline = rss_bytes(pid)
    started = time.perf_counter()
    with PeakRss(pid) as rss:
        moved = transfer(port, size)
    elapsed = time.perf_counter() - started
    if moved != size:
        raise BenchError(f"relayed {moved} bytes of {size}")
    return {
        "bytes": size,
        "seconds": round(elapsed, 2),
        "mib_per_s": round(size / MIB / elapsed, 1),
        "baseline_rss_mib": baseline / MIB,
        "peak_rss_mib": rss.peak / MIB,
        "rss_growth_mib": (rss.peak - baseline) / MIB,
    }


def memory(directory: Path, *, download: int, upload: int) -> dict[str, Any]:
    """Idle RSS of a fresh, ready proxy; peak RSS while it relays a download and an upload."""
    with ExitStack() as servers:
        fake = started(servers, start_fake_sobot(directory / "fake", free_port()))
        proxy = started(
            servers,
            start_sobot_proxy(
                directory / "sobot-proxy",
                free_port(),
                f"http://127.0.0.1:{fake.port}",
                cpus=None,
                # Production settings but for the body limit (64 MiB): the upload is bigger.
                SOBOT_MAX_BODY=str(max(upload, 64 * MIB)),
                SOBOT_TEMP_DIR=str(directory),
            ),
        )
        time.sleep(1.0)  # start-up settled: the token fetched, the refresher scheduled
        idle = rss_bytes(proxy.pid)
        # Run each path a few times first, so imports and buffers are not counted as growth.
        for _ in range(3):
            http_call(proxy.port, API_PATH)
            _download(proxy.port, 4 * MIB)
            _upload(proxy.port, 2 * MIB)
        return {
            "idle_rss_mib": idle / MIB,
            "download": _relay_measured(proxy.pid, _download, proxy.port, download),
            "upload": _relay_measured(proxy.pid, _upload, proxy.port, upload),
        }


# --- the real client ---------------------------------------------------------------------


def _timed_call(connect: Callable[[], http.client.HTTPConnection]) -> float:
    """Seconds for one call on a connection of its own: connect, (TLS,) request, answer."""
    started = time.perf_counter()
    connection = connect()
    try:
        connection.request("GET", API_PATH, headers={"token": TOKEN, "Connection": "close"})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise BenchError(f"real client: answered {response.status}")
    finally:
        connection.close()
    return time.perf_counter() - started


def real_client(directory: Path, *, calls: int, one_way_delay: float) -> dict[str, Any]:
    """A client opening a new connection per call, to a TLS upstream with network latency.

    Direct, every call pays TCP's handshake, TLS's and the request's round trips; through the
    proxy (on loopback, beside the client) it pays the request's round trip only, on one of
    the proxy's warm TLS connections.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tls = make_tls_files(directory)
    with ExitStack() as servers:
        upstream = started(
            servers, start_upstream(directory / "tls-upstream", free_port(), cpus=None, tls=tls)
        )
        relay_port = free_port()
        relay = Process(
            "latency relay",
            python_module(
                "bench.relay",
                "--port",
                str(relay_port),
                "--target-port",
                str(upstream.port),
                "--delay",
                str(one_way_delay),
            ),
            log_path=directory / "relay.log",
        )
        servers.callback(relay.stop)
        _wait_for_line(relay, f"listening {relay_port}")
        proxy = started(
            servers,
            start_sobot_proxy(
                directory / "sobot-proxy",
                free_port(),
                f"https://127.0.0.1:{relay_port}",
                cpus=None,
                SOBOT_CA_BUNDLE=str(tls.ca),
            ),
        )
        context = ssl.create_default_context(cafile=str(tls.ca))

        def direct() -> http.client.HTTPConnection:
            return http.client.HTTPSConnection("127.0.0.1", relay_port, timeout=10, context=context)

        def via_proxy() -> http.client.HTTPConnection:
            return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)

        for _ in range(2):  # the first calls pay for the proxy's first upstream connections
            _timed_call(direct)
            _timed_call(via_proxy)
        direct_times, proxy_times = [], []
        for _ in range(calls):  # alternated, so noise falls on both alike
            direct_times.append(_timed_call(direct))
            proxy_times.append(_timed_call(via_proxy))
    direct_ms = statistics.median(direct_times) * 1000
    proxy_ms = statistics.median(proxy_times) * 1000
    return {
        "calls": calls,
        "round_trip_ms": 2 * one_way_delay * 1000,
        "direct_ms_median": direct_ms,
        "proxy_ms_median": proxy_ms,
        "direct_ms_p90": _quantile(direct_times, 0.9) * 1000,
        "proxy_ms_p90": _quantile(proxy_times, 0.9) * 1000,
        "speedup": direct_ms / proxy_ms,
    }


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _wait_for_line(process: Process, line: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.check_alive()
        with contextlib.suppress(OSError):
            if line in process.log_path.read_text():
                return
        time.sleep(0.05)
    raise BenchError(f"{process.name}: no {line!r} within {timeout} s\n{process.tail()}")


# --- workers ---------------------------------------------------------------------------------


def workers(
    directory: Path,
    *,
    connections: int,
    seconds: float,
    repeats: int,
    warm_up: float,
    script: Path,
) -> dict[str, Any]:
    """Throughput of `--workers 2` against one worker, unpinned, at `connections`."""
    with ExitStack() as servers:
        upstream = started(
            servers, start_upstream(directory / "upstream", free_port(), cpus=UNPINNED.upstream)
        )
        url = f"http://127.0.0.1:{upstream.port}"
        targets, proxies = [], []
        for count in (1, 2):
            proxy = started(
                servers,
                start_sobot_proxy(
                    directory / f"workers-{count}",
                    free_port(),
                    url,
                    cpus=None,
                    workers=count,
                    name=f"sobot-proxy-{count}",
                ),
            )
            proxies.append(proxy)
            targets.append(Target(str(count), proxy.port, {}, proxy.pid))
        warm_up_targets(targets, seconds=warm_up, script=script, cpus=None)
        runs: dict[str, list[dict[str, Any]]] = {target.name: [] for target in targets}
        for _repeat in range(repeats):
            for target in targets:
                truncate(proxies)
                runs[target.name].append(
                    measure(
                        target,
                        connections=connections,
                        seconds=seconds,
                        script=script,
                        cpus=None,
                        upstream_pid=upstream.pid,
                    )
                )
    by_count = {name: summary(each) for name, each in runs.items()}
    one, two = by_count["1"], by_count["2"]
    for figures in (one, two):
        figures["proxy_busy_cores"] = (
            figures["requests_per_s"] * figures["cpu_us_per_request"] / 1e6
        )
    # wrk and the upstream share the workers' cores. Per request, a worker spends what one
    # worker did and wrk and the upstream what they did beside it: at that cost the cores can
    # serve at most `cores / (both)` requests a second, which caps the speedup this machine
    # can show however well the workers scale.
    cores = len(os.sched_getaffinity(0))
    per_request = (one["cpu_us_per_request"] + one["load_cpu_us_per_request"]) / 1e6
    ceiling_rate = cores / per_request
    return {
        "connections": connections,
        "workers": by_count,
        "speedup": two["requests_per_s"] / one["requests_per_s"],
        "load_generator_cpu_us_per_request": one["load_cpu_us_per_request"],
        "speedup_ceiling": ceiling_rate / one["requests_per_s"],
        "cores": cores,
    }
