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

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICK_TIMEOUT = 170  # the quick run takes well under a minute on two idle cores

pytestmark = pytest.mark.timeout(QUICK_TIMEOUT + 20)


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if missing:
        # Not a skip: a harness nobody runs rots. scripts/test installs them.
        pytest.fail(f"{', '.join(missing)} missing: `bash scripts/test` installs them")
    path = tmp_path_factory.mktemp("bench") / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| target | measured | met |" in done.stdout  # the table was printed
    return json.loads(path.read_text())


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


def test_every_target_is_reported_with_a_measurement(results):
    targets = results["targets"]
    assert len(targets) == 8
    for target in targets:
        assert is_number(target["measured"]), target
        assert isinstance(target["met"], bool)
    assert results["meta"]["quick"] is True
