"""wrk, the load generator: one run, its summary read back as numbers.

wrk prints its latency distribution rounded to two digits (`--latency`); a `done` hook in Lua
prints the same histogram's percentiles in whole microseconds, and the error counts, as one
JSON line, which is what is read back.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from bench.system import BenchError, on_cpus, require_tools

MARKER: Final = "BENCH-SUMMARY "
SUMMARY_SCRIPT: Final = """
-- Written by the benchmark harness: wrk's summary as one JSON line, in microseconds.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"non_2xx":%.0f,"socket_errors":%.0f,' ..
    '"timeouts":%.0f,"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"mean_us":%.1f,"max_us":%.0f}\\n',
    "MARKER", summary.requests, summary.duration, summary.bytes, e.status,
    e.connect + e.read + e.write, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max))
end
""".replace("MARKER", MARKER)


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    requests_per_s: float
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    max_us: float
    non_2xx: int
    socket_errors: int
    timeouts: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_script(directory: Path) -> Path:
    path = directory / "summary.lua"
    path.write_text(SUMMARY_SCRIPT)
    return path


def run_wrk(
    url: str,
    *,
    connections: int,
    seconds: float,
    script: Path,
    cpus: str | None,
    headers: Mapping[str, str] | None = None,
    threads: int = 1,
) -> WrkResult:
    """One wrk run of `seconds` with `connections` kept-alive connections (closed loop)."""
    wrk = require_tools("wrk")["wrk"]
    argv = [
        wrk,
        "--latency",
        "-t",
        str(min(threads, connections)),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
    ]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    # Fixed arguments built here, with wrk's full path.
    done = subprocess.run(  # noqa: S603
        on_cpus(cpus, argv),
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    summary = next((line for line in done.stdout.splitlines() if line.startswith(MARKER)), None)
    if done.returncode != 0 or summary is None:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    raw = json.loads(summary.removeprefix(MARKER))
    seconds_run = raw["duration_us"] / 1e6
    return WrkResult(
        requests=int(raw["requests"]),
        seconds=round(seconds_run, 3),
        requests_per_s=raw["requests"] / seconds_run if seconds_run else 0.0,
        p50_us=raw["p50_us"],
        p90_us=raw["p90_us"],
        p99_us=raw["p99_us"],
        mean_us=raw["mean_us"],
        max_us=raw["max_us"],
        non_2xx=int(raw["non_2xx"]),
        socket_errors=int(raw["socket_errors"]),
        timeouts=int(raw["timeouts"]),
    )
