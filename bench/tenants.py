"""The tenants scenario: what 1,000 Sobot companies in one proxy cost, against one.

Two proxies run against ONE fake Sobot serving 1,001 companies (`fake-sobot --companies-file`):
`1 tenant` is a proxy as configured today (its own appid, no tenants); `1,000 tenants` has the
same `default` plus 1,000 named tenants (100 with --quick) generated into a TOML file
(`[tenants.tNNNN]`, each its own appid and `app_key_file`). Each has its own default appid, so
neither ever supersedes the other's token.

    start-up   process start to `/readyz` answering 200, each proxy started `repeats` times
    RSS        after start-up (the default tenant used, the named ones idle), then after every
               named tenant has fetched its token (one request each): KiB per idle tenant is
               (1,000's RSS - 1's RSS) / 1,000, KiB per used tenant the growth / 1,000
    CPU        us per request of the proxy process (/proc), under wrk at c=16 for the same
               time, in interleaved rounds: 1 tenant (no header); 1,000 tenants with
               `X-Sobot-Tenant` drawn at random per request from all 1,000 (a wrk Lua
               `request` function), every tenant's token already held; 1,000 tenants
               configured but every request `default`'s. Medians, and 1,000 / 1.

The fake is a Python server, slower than the proxy: req/s here say little, CPU per request is
the figure (it does not depend on how fast the upstream is, only on what the proxy does).
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

# The throughput scenario's measuring, so the figures are taken exactly as it takes them.
from bench.scenarios import (
    Target,
    measure,
    median,
    ratio,
    started,
    summary,
    truncate,
    warm_up_targets,
)
from bench.system import (
    MIB,
    BenchError,
    Placement,
    free_port,
    http_call,
    rss_bytes,
)
from bench.upstreams import (
    API_PATH,
    APP_KEY,
    Server,
    start_fake_sobot,
    start_sobot_proxy,
)

TENANTS: Final = 1000  # the full run's; --quick runs 100
TENANT_HEADER: Final = "X-Sobot-Tenant"
SINGLE_APPID: Final = "bench-single-appid"  # the 1-tenant proxy's own company
# The setups, as the results name them: one tenant; N tenants, requests spread over all of
# them; the same proxy with every request default's.
ONE: Final = "one"
SPREAD: Final = "many"
DEFAULT_ONLY: Final = "many_default_only"
START_UP_LIMIT: Final = 300.0  # seconds; beyond it the run stops
ONE_START_ENOUGH: Final = 30.0  # seconds: a start slower than this is not repeated
SETTLE: Final = 1.0  # seconds for start-up's tasks (token fetch, refresher) to settle before RSS

# wrk picks a tenant per request: the requests are formatted once per thread, in `init`.
_PICK_TENANT: Final = """
local count = COUNT
local prepared = {}
init = function(args)
  for i = 1, count do
    prepared[i] = wrk.format(nil, nil, {["HEADER"] = string.format("t%04d", i - 1)})
  end
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
end
request = function()
  return prepared[math.random(count)]
end
"""


def tenant_name(index: int) -> str:
    return f"t{index:04d}"


@dataclass(frozen=True, slots=True)
class TenantFiles:
    config: Path  # the 1,000-tenant TOML file
    companies: Path  # the fake's companies file: every named tenant's, and SINGLE_APPID's
    pick_script: Path  # wrk: the summary, and a tenant drawn per request


def write_files(directory: Path, summary_script: Path, count: int) -> TenantFiles:
    """The TOML file of `count` named tenants with their key files, the fake's companies file,
    and the wrk script that spreads requests over the tenants."""
    keys = directory / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    config_lines, company_lines = [], [f"{SINGLE_APPID} {APP_KEY}-single"]
    for index in range(count):
        name = tenant_name(index)
        # A key of the real ones' shape (32 hex digits), random: keys sharing a prefix would
        # flatter anything that matches keys in text (the log scrubber does).
        appid, key = f"bench-{name}-appid", secrets.token_hex(16)
        key_file = keys / name
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        config_lines += [f"[tenants.{name}]", f'appid = "{appid}"', f'app_key_file = "{key_file}"']
        company_lines.append(f"{appid} {key}")
    files = TenantFiles(
        directory / "tenants.toml", directory / "companies", directory / "pick-tenant.lua"
    )
    files.config.write_text("\n".join(config_lines) + "\n")
    files.companies.write_text("\n".join(company_lines) + "\n")
    files.companies.chmod(0o600)
    pick = _PICK_TENANT.replace("COUNT", str(count)).replace("HEADER", TENANT_HEADER)
    files.pick_script.write_text(summary_script.read_text() + pick)
    return files


def _start(
    directory: Path, fake: Server, placement: Placement, files: TenantFiles | None
) -> tuple[Server, float]:
    """A proxy, and the seconds from its start to `/readyz` answering 200."""
    name = "sobot-proxy-many" if files is not None else "sobot-proxy-1"
    start = functools.partial(
        start_sobot_proxy,
        directory / name,
        free_port(),
        f"http://127.0.0.1:{fake.port}",
        cpus=placement.proxy,
        name=name,
        poll=0.005,
        # Measured, not required: a slow start is a figure to print, not a failed run.
        timeout=START_UP_LIMIT,
    )
    began = time.perf_counter()
    if files is not None:
        proxy = start(SOBOT_PROXY_CONFIG=str(files.config))
    else:
        proxy = start(SOBOT_APPID=SINGLE_APPID, SOBOT_APP_KEY=f"{APP_KEY}-single")
    return proxy, time.perf_counter() - began


def _fake_stats(fake: Server) -> dict[str, int]:
    status, body = http_call(fake.port, "/_fake/stats")
    if status != 200:
        raise BenchError(f"fake sobot stats answered {status}")
    stats: dict[str, int] = json.loads(body)
    return stats


def _call(port: int, headers: dict[str, str]) -> None:
    status, body = http_call(port, API_PATH, headers=headers)
    if status != 200 or json.loads(body).get("ret_code") != "000000":
        raise BenchError(f"a request for {headers or 'default'} answered {status}: {body[:200]!r}")


def _use_every_tenant(proxy: Server, fake: Server, count: int) -> int:
    """One request for each named tenant, so each fetches and holds its token; the tokens the
    fake issued meanwhile (`count` when each tenant fetched once)."""
    before = _fake_stats(fake)["tokens_issued"]
    for index in range(count):
        _call(proxy.port, {TENANT_HEADER: tenant_name(index)})
    return _fake_stats(fake)["tokens_issued"] - before


def tenants(
    directory: Path,
    placement: Placement,
    *,
    seconds: float,
    repeats: int,
    warm_up: float,
    script: Path,
    count: int = TENANTS,
    connections: int = 16,
) -> dict[str, Any]:
    """Start-up time, RSS and CPU per request with 1 tenant against `count` (see the module)."""
    files = write_files(directory, script, count)
    with ExitStack() as servers:
        fake = started(
            servers,
            start_fake_sobot(
                directory / "fake", free_port(), cpus=placement.upstream, companies=files.companies
            ),
        )
        start_up: dict[str, list[float]] = {ONE: [], SPREAD: []}
        for repeat in range(repeats):
            # Interleaved, so a slow moment of the machine falls on both.
            one, one_seconds = _start(directory, fake, placement, None)
            started(servers, one)
            many, many_seconds = _start(directory, fake, placement, files)
            started(servers, many)
            start_up[ONE].append(one_seconds)
            start_up[SPREAD].append(many_seconds)
            if repeat == repeats - 1 or many_seconds > ONE_START_ENOUGH:
                break  # a start this slow is far off any target: once is enough to say so
            one.stop()
            many.stop()
        # The default tenant's path used (imports, buffers, the upstream connection), so that
        # what the named tenants add is all that differs.
        for _ in range(20):
            _call(one.port, {})
            _call(many.port, {})
        time.sleep(SETTLE)
        rss_idle = {ONE: rss_bytes(one.pid), SPREAD: rss_bytes(many.pid)}
        began = time.perf_counter()
        fetched = _use_every_tenant(many, fake, count)
        first_use = (time.perf_counter() - began) / count
        if fetched != count:
            raise BenchError(f"{count} tenants used, but the fake issued {fetched} tokens")
        time.sleep(SETTLE)
        rss_used = rss_bytes(many.pid)

        targets = [
            Target(ONE, one.port, {}, one.pid),
            Target(SPREAD, many.port, {}, many.pid),
            Target(DEFAULT_ONLY, many.port, {}, many.pid),
        ]
        scripts = {ONE: script, SPREAD: files.pick_script, DEFAULT_ONLY: script}
        for target in targets:
            warm_up_targets(
                [target], seconds=warm_up, script=scripts[target.name], cpus=placement.load
            )
        runs: dict[str, list[dict[str, Any]]] = {target.name: [] for target in targets}
        before_load = _fake_stats(fake)["tokens_issued"]
        for _repeat in range(repeats):
            for target in targets:
                truncate((fake, one, many))
                runs[target.name].append(
                    measure(
                        target,
                        connections=connections,
                        seconds=seconds,
                        script=scripts[target.name],
                        cpus=placement.load,
                    )
                )
        under_load = _fake_stats(fake)["tokens_issued"] - before_load
        rss_after_load = rss_bytes(many.pid)
    by_setup = {name: summary(each) for name, each in runs.items()}
    cpu = {name: figures["cpu_us_per_request"] for name, figures in by_setup.items()}
    per_round = [
        spread["cpu_us_per_request"] / single["cpu_us_per_request"]
        for single, spread in zip(runs[ONE], runs[SPREAD], strict=True)
        if single.get("cpu_us_per_request") and spread.get("cpu_us_per_request") is not None
    ]
    return {
        "tenants": count,
        "connections": connections,
        "placement": {
            "load_generator_cpus": placement.load,
            "upstream_cpus": placement.upstream,
            "proxy_cpus": placement.proxy,
        },
        "load": by_setup,
        "cpu_ratio": ratio(cpu[SPREAD], cpu[ONE]),
        "cpu_ratio_default_only": ratio(cpu[DEFAULT_ONLY], cpu[ONE]),
        "cpu_ratio_per_round": [round(ratio, 3) for ratio in per_round],
        "start_up_s": {name: median(samples) for name, samples in start_up.items()},
        "start_up_samples_s": {
            name: [round(sample, 3) for sample in samples] for name, samples in start_up.items()
        },
        "start_up_ratio": ratio(median(start_up[SPREAD]), median(start_up[ONE])),
        "rss_idle_mib": {name: value / MIB for name, value in rss_idle.items()},
        "rss_used_mib": rss_used / MIB,
        "rss_after_load_mib": rss_after_load / MIB,
        "kib_per_idle_tenant": (rss_idle[SPREAD] - rss_idle[ONE]) / count / 1024,
        "kib_per_used_tenant": (rss_used - rss_idle[SPREAD]) / count / 1024,
        "tokens_fetched_in_warm_up": fetched,
        # A tenant's first request, one after another: it fetches the tenant's token.
        "first_use_ms_per_tenant": first_use * 1000,
        # 0: every tenant held its token through the load (no fetch, no replay).
        "tokens_issued_under_load": under_load,
    }
