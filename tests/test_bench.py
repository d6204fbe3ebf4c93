"""The benchmark harness runs end to end (`python -m bench --quick`), so it cannot rot.

Only that it runs and reports every figure is checked: never a time, which on a shared machine
would make a flaky test and say nothing about the code.
"""

from __future__ import annotations

import json
import numbers
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICK_TIMEOUT = 170  # the quick run takes well under a minute on two idle cores

pytestmark = pytest.mark.timeout(QUICK_TIMEOUT + 20)


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class Run(NamedTuple):
    results: dict[str, Any]  # the JSON written
    table: str  # what was printed


def quick_run(directory: Path, *options: str) -> Run:
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if missing:
        # Not a skip: a harness nobody runs rots. scripts/test installs them.
        pytest.fail(f"{', '.join(missing)} missing: `bash scripts/test` installs them")
    path = directory / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(path), *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| target | measured | met |" in done.stdout  # the table was printed
    return Run(json.loads(path.read_text()), done.stdout)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return quick_run(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def results(plain_run):
    return plain_run.results


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory):
    """This repository as its own baseline: same code, so only the harness is under test."""
    if Path(sys.executable) == ROOT / ".venv" / "bin" / "python":
        return ROOT
    # Run by another interpreter: a checkout of the same code whose .venv/bin/python is this
    # one. A wrapper, not a symlink: a venv's python started through a symlink elsewhere does
    # not find its pyvenv.cfg, nor so its packages.
    directory = tmp_path_factory.mktemp("baseline")
    (directory / "proxy").symlink_to(ROOT / "proxy")
    python = directory / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return directory


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory, baseline_dir):
    return quick_run(tmp_path_factory.mktemp("bench-baseline"), "--baseline", str(baseline_dir))


def test_every_setup_and_concurrency_has_its_figures(results):
    placements = results["throughput"]
    expected = {"unpinned", "pinned"} if len(os.sched_getaffinity(0)) >= 2 else {"unpinned"}
    assert set(placements) == expected
    for placement in placements.values():
        assert set(placement["concurrency"]) == {"1", "16", "64"}
        for row in placement["concurrency"].values():
            assert set(row) == {"direct", "nginx proxy", "sobot-proxy"}
            for setup, figures in row.items():
                for key in ("requests_per_s", "p50_us", "p99_us"):
                    assert is_number(figures[key]), (setup, key)
                assert figures["requests"] > 0
                assert figures["errors"] == 0  # every request answered 2xx
                if setup != "direct":
                    for key in ("added_p50_us", "added_p99_us", "throughput_vs_nginx"):
                        assert is_number(figures[key]), (setup, key)
                    assert is_number(figures["cpu_us_per_request"]), setup


def test_workers_memory_and_the_real_client_are_measured(results):
    workers = results["workers"]
    assert set(workers["workers"]) == {"1", "2"}
    assert all(w["errors"] == 0 for w in workers["workers"].values())
    assert is_number(workers["speedup"])
    assert is_number(workers["speedup_ceiling"])
    assert is_number(workers["load_generator_cpu_us_per_request"])
    for figures in workers["workers"].values():
        assert is_number(figures["proxy_busy_cores"])
        assert is_number(figures["machine_idle_cores"])
        assert is_number(figures["load_cpu_us_per_request"])
    memory = results["memory"]
    assert is_number(memory["idle_rss_mib"])
    for kind in ("download", "upload"):
        assert memory[kind]["bytes"] > 0
        assert is_number(memory[kind]["rss_growth_mib"])
    client = results["real_client"]
    for key in ("direct_ms_median", "proxy_ms_median", "speedup"):
        assert is_number(client[key]), key


def test_tenants_are_measured_one_against_many(plain_run):
    tenants = plain_run.results["tenants"]
    assert tenants["tenants"] == 100  # the quick run's count; the full run's is 1,000
    assert set(tenants["load"]) == {"one", "many", "many_default_only"}
    for figures in tenants["load"].values():
        assert figures["requests"] > 0
        assert figures["errors"] == 0
        assert is_number(figures["cpu_us_per_request"])
    for key in (
        "cpu_ratio",
        "cpu_ratio_default_only",
        "start_up_ratio",
        "rss_used_mib",
        "first_use_ms_per_tenant",
    ):
        assert is_number(tenants[key]), key
    for key in ("kib_per_idle_tenant", "kib_per_used_tenant"):
        assert is_number(tenants[key]), key
    for key in ("start_up_s", "rss_idle_mib"):
        assert set(tenants[key]) == {"one", "many"}
        assert all(is_number(value) for value in tenants[key].values()), key
    # Every tenant fetched its token once, in the warm-up, and held it through the load.
    assert tenants["tokens_fetched_in_warm_up"] == 100
    assert tenants["tokens_issued_under_load"] == 0
    assert "| | 1 tenant | 100 tenants | 100 / 1 |" in plain_run.table


def test_one_scenario_runs_alone_with_its_targets_only(tmp_path):
    results, table = quick_run(tmp_path, "--only", "tenants")
    assert set(results) == {"meta", "tenants", "targets"}
    assert [target["target"].split(" <=")[0] for target in results["targets"]] == [
        "CPU per request, 1,000 tenants (quick: 100) / 1 tenant",
        "start-up to /readyz with 1,000 tenants (quick: 100)",
        "RSS per idle tenant",
    ]
    assert "Tenants: 1 against 100" in table
    assert "Throughput" not in table


def test_every_target_is_reported_with_a_measurement(results):
    targets = results["targets"]
    assert len(targets) == 11
    for target in targets:
        assert is_number(target["measured"]), target
        assert isinstance(target["met"], bool)
    assert results["meta"]["quick"] is True


def test_without_a_baseline_there_is_none_in_results_or_table(plain_run):
    assert "baseline" not in plain_run.results["meta"]
    for placement in plain_run.results["throughput"].values():
        assert "after_vs_baseline" not in placement
    assert "baseline" not in plain_run.table


def test_a_baseline_runs_beside_sobot_proxy_with_ratios(baseline_run, baseline_dir):
    results, table = baseline_run
    meta = results["meta"]
    assert meta["baseline"]["path"] == str(baseline_dir.resolve())
    if baseline_dir == ROOT:  # the same checkout: git reads the same commit
        assert meta["baseline"]["commit"] == meta["commit"]
    assert f"baseline: commit {meta['baseline']['commit']}, from {baseline_dir.resolve()}" in table
    placements = results["throughput"]
    assert placements  # at least the unpinned one
    for placement in placements.values():
        for row in placement["concurrency"].values():
            assert list(row) == ["direct", "nginx proxy", "sobot-proxy", "sobot-proxy baseline"]
            baseline = row["sobot-proxy baseline"]
            assert baseline["requests"] > 0
            assert baseline["errors"] == 0
            for key in ("requests_per_s", "p50_us", "added_p50_us", "cpu_us_per_request"):
                assert is_number(baseline[key]), key
        ratios = placement["after_vs_baseline"]
        assert set(ratios) == {"1", "16", "64"}
        for per_concurrency in ratios.values():
            assert set(per_concurrency) == {"requests_per_s", "cpu_us_per_request"}
            assert all(is_number(ratio) for ratio in per_concurrency.values())
    # Printed: the fourth row at each concurrency, and the ratios, for each placement.
    for c in ("1", "16", "64"):
        assert table.count(f"| {c} | sobot-proxy baseline | ") == len(placements)
    assert table.count("sobot-proxy against sobot-proxy baseline (after / before)") == len(
        placements
    )
    assert table.count("| c | req/s | CPU us/req |") == len(placements)


@pytest.mark.parametrize("layout", ["empty", "no-venv"])
def test_a_baseline_that_is_not_a_checkout_with_a_venv_is_refused(tmp_path, layout):
    if layout == "no-venv":
        (tmp_path / "proxy").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--baseline", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    expected = "no proxy/ there" if layout == "empty" else "no .venv/bin/python there"
    assert done.stderr.startswith(f"bench: --baseline {tmp_path}: {expected}")
    assert done.stderr.count("\n") == 1  # one line
