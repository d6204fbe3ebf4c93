"""`python -m bench [--quick] [--json PATH] [--baseline DIR] [--only SCENARIO]`: run every
scenario (or the one named), print the table, write JSON.

`--baseline DIR` shows a change's before and after in one run: DIR is another checkout of
sobot-proxy (an earlier commit) with its own virtualenv in DIR/.venv, for example

    git worktree add --detach /tmp/base <commit>
    python3 -m venv /tmp/base/.venv && /tmp/base/.venv/bin/pip install -e /tmp/base

and its proxy runs in the throughput scenario beside this one, placed, interleaved and
measured alike, with this one's req/s and CPU per request over its own.

Exit status 0 when every scenario ran and every request succeeded, whether or not the targets
are met (they are measurements, reported next to the targets); 1 when a scenario could not run
or requests failed, since failed requests make the figures meaningless; 2 for a DIR that is not
a checkout with a virtualenv.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench import scenarios, tenants
from bench.load import write_script
from bench.report import check_targets, render
from bench.system import (
    MIB,
    ROOT,
    UNPINNED,
    BenchError,
    Checkout,
    baseline_checkout,
    pinned_placement,
    require_tools,
)

DEFAULT_JSON = ROOT / "bench" / "results" / "latest.json"


@dataclass(frozen=True, slots=True)
class Plan:
    """How long and how big: the full run, or the quick one the test suite runs."""

    seconds: float
    repeats: int
    warm_up: float
    concurrencies: tuple[int, ...]
    download: int
    upload: int
    tls_calls: int
    one_way_delay: float = 0.010
    workers_connections: int = 64
    tenants: int = 1000


FULL = Plan(
    seconds=5,
    repeats=3,
    warm_up=2,
    concurrencies=(1, 16, 64),
    download=1024 * MIB,
    upload=256 * MIB,
    tls_calls=40,
)
QUICK = Plan(
    seconds=1,
    repeats=1,
    warm_up=0,
    concurrencies=(1, 16, 64),
    download=64 * MIB,
    upload=32 * MIB,
    tls_calls=5,
    tenants=100,
)


def _progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _output(*argv: str) -> str:
    """What a version command says, on stdout or stderr (nginx -v and wrk -v differ)."""
    try:
        # Fixed commands, for the record only.
        done = subprocess.run(  # noqa: S603
            list(argv), capture_output=True, text=True, timeout=10, check=False, cwd=ROOT
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _commit(root: Path) -> str:
    """The commit checked out in `root`, and whether its work tree differs from it (read-only
    git calls)."""
    git = shutil.which("git")
    if git is None:
        return "unknown"
    try:
        # Fixed read-only git commands, for the record only.
        head = subprocess.run(  # noqa: S603
            [git, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
            cwd=root,
        ).stdout.strip()
        changes = subprocess.run(  # noqa: S603
            [git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
            cwd=root,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} (with uncommitted changes)" if changes else head


def _meta(plan: Plan, quick: bool, baseline: Checkout | None) -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    meta: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": os.environ.get("BENCH_COMMAND") or "python -m bench " + " ".join(sys.argv[1:]),
        "quick": quick,
        "commit": _commit(ROOT),
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "nginx": _output("nginx", "-v").removeprefix("nginx version: "),
        "wrk": " ".join(_output("wrk", "-v").split()[:2]),
        "seconds": plan.seconds,
        "repeats": plan.repeats,
        "concurrencies": list(plan.concurrencies),
    }
    if baseline is not None:  # absent without --baseline: the results are as they were
        meta["baseline"] = {"path": str(baseline.root), "commit": _commit(baseline.root)}
    return meta


SCENARIOS: Final = ("throughput", "workers", "memory", "real_client", "tenants")


def run(
    plan: Plan,
    *,
    quick: bool,
    work: Path,
    baseline: Checkout | None,
    only: str | None = None,
) -> dict[str, Any]:
    script = write_script(work)
    results: dict[str, Any] = {"meta": _meta(plan, quick, baseline)}
    chosen = [only] if only else list(SCENARIOS)
    placements = [p for p in (pinned_placement(), UNPINNED) if p is not None]
    if "throughput" in chosen:
        results["throughput"] = {}
    for placement in placements if "throughput" in chosen else ():
        _progress(f"throughput, {placement.name}")
        results["throughput"][placement.name] = scenarios.throughput(
            work / placement.name,
            placement,
            concurrencies=plan.concurrencies,
            seconds=plan.seconds,
            repeats=plan.repeats,
            warm_up=plan.warm_up,
            script=script,
            baseline=baseline,
        )
    if "workers" in chosen:
        _progress("workers: 2 versus 1, unpinned")
        results["workers"] = scenarios.workers(
            work / "workers",
            connections=plan.workers_connections,
            seconds=plan.seconds,
            repeats=plan.repeats,
            warm_up=plan.warm_up,
            script=script,
        )
    if "memory" in chosen:
        _progress("memory: idle, download, upload")
        results["memory"] = scenarios.memory(
            work / "memory", download=plan.download, upload=plan.upload
        )
    if "real_client" in chosen:
        _progress("real client: new TLS connection per call, direct versus through the proxy")
        results["real_client"] = scenarios.real_client(
            work / "real-client", calls=plan.tls_calls, one_way_delay=plan.one_way_delay
        )
    if "tenants" in chosen:
        _progress(f"tenants: 1 versus {plan.tenants:,}, {placements[0].name}")
        results["tenants"] = tenants.tenants(
            work / "tenants",
            placements[0],
            seconds=plan.seconds,
            repeats=plan.repeats,
            warm_up=plan.warm_up,
            script=script,
            count=plan.tenants,
        )
    results["targets"] = check_targets(results)
    return results


def _failed_requests(results: dict[str, Any]) -> int:
    rows = [
        figures
        for placement in results.get("throughput", {}).values()
        for row in placement["concurrency"].values()
        for figures in row.values()
    ]
    rows += list(results.get("workers", {}).get("workers", {}).values())
    rows += list(results.get("tenants", {}).get("load", {}).values())
    return sum(figures["errors"] for figures in rows)


def main() -> int:
    # Raw: the docstring's command lines stay as written.
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="every scenario, ~1 s each, small sizes"
    )
    parser.add_argument(
        "--json",
        type=Path,
        help=f"results file (default {DEFAULT_JSON}; with --only, SCENARIO.json beside it)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also run DIR's proxy in the throughput scenario, for before/after figures: "
        "DIR is another checkout with its own DIR/.venv (see above)",
    )
    parser.add_argument(
        "--only",
        choices=SCENARIOS,
        metavar="SCENARIO",
        help=f"run this scenario alone: one of {', '.join(SCENARIOS)}",
    )
    args = parser.parse_args()
    # A partial run does not overwrite the whole run's results.
    json_path = args.json or (
        DEFAULT_JSON.with_name(f"{args.only}.json") if args.only else DEFAULT_JSON
    )
    plan = QUICK if args.quick else FULL
    try:
        baseline = baseline_checkout(args.baseline) if args.baseline else None
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    try:
        require_tools("nginx", "wrk")
        with tempfile.TemporaryDirectory(prefix="sobot-bench-") as work:
            results = run(
                plan, quick=args.quick, work=Path(work), baseline=baseline, only=args.only
            )
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    print(f"\nresults: {json_path}")
    failed = _failed_requests(results)
    if failed:
        print(f"bench: {failed} requests failed: the figures are not valid", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
