"""The deployment examples in config/ and the Dockerfile agree with the settings and each other.

Each example is parsed as its tool would read it (YAML with anchors and merge keys), and the
environment each proxy would run with (the image's ENV defaults, then the example's) is fed
through the real loader. Grace periods are checked against the proxy's shutdown: after SIGTERM
it drains for SOBOT_SHUTDOWN_GRACE seconds, then takes up to CLOSE_SECONDS to close.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import ipaddress
import json
import os
import re
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from aiohttp.test_utils import TestClient

from proxy.config.settings import CONFIG_ENV, OPTIONS, SECRETS, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config"
DOCKERFILE = (ROOT / "Dockerfile").read_text()
EXAMPLES = sorted([*CONFIG.glob("*.yaml"), *CONFIG.glob("*.yml")])
KUBERNETES = CONFIG / "kubernetes.yaml"
COMPOSE = CONFIG / "compose.yaml"
COMPOSE_REDIS = CONFIG / "compose.redis.yaml"

KNOWN_ENV = (
    {o.env for o in OPTIONS} | {n for s in SECRETS for n in (s.env, s.file_env)} | {CONFIG_ENV}
)
FILE_ENV = {s.file_env for s in SECRETS} | {"SOBOT_CA_BUNDLE", CONFIG_ENV}
DEFAULT_GRACE = next(o.default for o in OPTIONS if o.name == "shutdown_grace")
DEFAULT_PORT = next(o.default for o in OPTIONS if o.name == "port")
# After its drain the proxy closes its connections and resources: measured up to 1.6 s.
CLOSE_SECONDS = 2.0
DOCKER_STOP_TIMEOUT = 10.0  # `docker stop` and `docker compose stop` without a timeout
# Measured for config/kubernetes.yaml (see its comment): idle, and 500 clients sending 256 KiB.
IDLE_RSS_MIB = 49
LOADED_RSS_MIB = 140
# What a probe can run inside the image (python:*-slim has no curl or wget).
IMAGE_PROGRAMS = {"python", "sobot-proxy"}
CURL_URL = "http://127.0.0.1:8080/healthz"


def documents(path: Path) -> list[dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs, path
    assert all(isinstance(doc, dict) for doc in docs), path
    return docs


# --- the Dockerfile -------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for parts in (line.strip().split(None, 1) for line in joined.splitlines())
        if parts
    ]


def image_env() -> dict[str, str]:
    """The SOBOT_* defaults the image sets with ENV."""
    env: dict[str, str] = {}
    for instruction, arguments in dockerfile_instructions():
        if instruction == "ENV":
            for word in shlex.split(arguments):
                name, _, value = word.partition("=")
                if name.startswith("SOBOT_"):
                    env[name] = value
    return env


def test_the_dockerfile_builds_in_stages_from_a_pinned_slim_python():
    instructions = dockerfile_instructions()
    args = {
        name: value
        for instruction, arguments in instructions
        if instruction == "ARG"
        for name, _, value in [arguments.partition("=")]
    }
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], arguments.split()[0])
        for instruction, arguments in instructions
        if instruction == "FROM"
    ]
    assert len(bases) >= 2  # build and run
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base


def test_the_image_runs_serve_as_a_numeric_non_root_user_stopped_by_sigterm():
    instructions = dict(dockerfile_instructions())  # the last of each
    user = instructions["USER"].split(":")
    assert all(part.isdigit() and int(part) > 0 for part in user), user
    assert instructions["STOPSIGNAL"] == "SIGTERM"
    assert instructions["ENTRYPOINT"] == '["sobot-proxy", "serve"]'
    healthcheck = instructions["HEALTHCHECK"]
    assert "/healthz" in healthcheck
    assert "SOBOT_PROXY_PORT" in healthcheck  # follows the port the proxy is configured with
    assert "127.0.0.1" in healthcheck


def test_the_images_environment_names_settings_and_fits_docker_stop():
    env = image_env()
    assert set(env) <= KNOWN_ENV
    grace = float(env.get("SOBOT_SHUTDOWN_GRACE", DEFAULT_GRACE))
    assert grace + CLOSE_SECONDS < DOCKER_STOP_TIMEOUT


# --- what every example says about its proxies ------------------------------------------------


@dataclass
class Proxy:
    """One proxy container of an example, with the environment it would run with."""

    example: str
    name: str
    env: dict[str, str]  # the image's ENV, then the example's
    spec: dict[str, Any]  # its container or service definition

    @property
    def grace(self) -> float:
        return float(self.env.get("SOBOT_SHUTDOWN_GRACE", DEFAULT_GRACE))

    @property
    def port(self) -> int:
        return int(self.env.get("SOBOT_PROXY_PORT", DEFAULT_PORT))

    @property
    def host(self) -> str:
        return self.env.get("SOBOT_PROXY_HOST", "127.0.0.1")


def is_proxy_image(image: object) -> bool:
    return isinstance(image, str) and "sobot-proxy" in image.rsplit("/", 1)[-1]


def kubernetes_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec.get("containers", [])] if spec else []


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc.get("kind") == "Pod":
        return dict(doc["spec"])
    if doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return dict(doc["spec"]["template"]["spec"])
    return None


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        return dict(str(item).partition("=")[::2] for item in environment)
    return {str(k): "" if v is None else str(v) for k, v in environment.items()}


def proxies(path: Path) -> list[Proxy]:
    return proxies_in(documents(path), path.name)


def proxies_in(docs: list[dict[str, Any]], example: str) -> list[Proxy]:
    found = []
    for doc in docs:
        for container in kubernetes_containers(doc):
            if is_proxy_image(container.get("image")):
                env = {
                    item["name"]: str(item.get("value", "")) for item in container.get("env", [])
                }
                found.append(Proxy(example, container["name"], {**image_env(), **env}, container))
        for name, service in (doc.get("services") or {}).items():
            if is_proxy_image(service.get("image")) and not service.get("entrypoint"):
                env = {**image_env(), **compose_env(service)}
                found.append(Proxy(example, name, env, service))
    return found


def all_proxies() -> list[Proxy]:
    return [proxy for path in EXAMPLES for proxy in proxies(path)]


def proxy_id(proxy: Proxy) -> str:
    return f"{proxy.example}:{proxy.name}"


def test_the_examples_are_there_and_parse():
    assert {KUBERNETES, COMPOSE, COMPOSE_REDIS} <= set(EXAMPLES)
    for path in EXAMPLES:
        documents(path)
        assert proxies(path), f"{path.name} runs no sobot-proxy"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_every_sobot_name_in_an_example_is_a_setting(path):
    # Comments included: a commented-out line is one an operator will uncomment.
    names = set(re.findall(r"\bSOBOT_[A-Z0-9_]+\b", path.read_text()))
    assert names <= KNOWN_ENV, sorted(names - KNOWN_ENV)


@pytest.mark.parametrize("proxy", all_proxies(), ids=proxy_id)
def test_every_proxy_is_given_the_required_settings_with_the_app_key_as_a_file(proxy):
    env = proxy.env
    assert env.get("SOBOT_APPID")
    assert env.get("SOBOT_REGION") or env.get("SOBOT_BASE_URL")
    # From a mounted secret: never the value itself in a deployment's environment.
    assert env.get("SOBOT_APP_KEY_FILE")
    assert "SOBOT_APP_KEY" not in env


def load_proxy_settings(proxy: Proxy, tmp_path: Path) -> Settings:
    """The settings `proxy` would run with, its files (only in the container) as placeholders."""
    env = dict(proxy.env)
    for name in FILE_ENV & set(env):
        placeholder = tmp_path / name.lower()
        placeholder.write_text("" if name == CONFIG_ENV else "placeholder-secret\n")
        env[name] = str(placeholder)
    if "SOBOT_TEMP_DIR" in env:
        env["SOBOT_TEMP_DIR"] = str(tmp_path)
    return load_settings({}, env)


@pytest.mark.parametrize("proxy", all_proxies(), ids=proxy_id)
def test_every_proxys_environment_loads_without_a_configuration_error(proxy, tmp_path):
    settings = load_proxy_settings(proxy, tmp_path)
    assert isinstance(settings, Settings)
    assert settings.app_key == "placeholder-secret"


@pytest.mark.parametrize("proxy", all_proxies(), ids=proxy_id)
def test_every_sidecar_listens_on_loopback_only(proxy):
    assert ipaddress.ip_address(proxy.host).is_loopback


# --- Kubernetes -------------------------------------------------------------------------------


def kubernetes_workloads() -> list[dict[str, Any]]:
    return [doc for doc in documents(KUBERNETES) if pod_spec(doc) is not None]


def quantity_mib(value: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "K": 1e3 / 2**20, "M": 1e6 / 2**20}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?)", str(value))
    assert match is not None, value
    return float(match[1]) * units[match[2]]


def probe_target(probe: dict[str, Any], container: dict[str, Any]) -> tuple[str, int, str]:
    """(host, port, path) a probe calls. httpGet goes to the pod's IP; exec runs inside."""
    if "httpGet" in probe:
        get = probe["httpGet"]
        port = get["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in container["ports"] if p.get("name") == port)
        return get.get("host", "pod-ip"), int(port), get["path"]
    command = " ".join(probe["exec"]["command"])
    url = re.search(r"https?://([^/:'\"\s]+):(\d+)(/[\w/]*)", command)
    assert url is not None, command
    return url[1], int(url[2]), url[3]


def test_kubernetes_runs_the_proxy_as_a_native_sidecar_of_the_application():
    (workload,) = kubernetes_workloads()
    spec = pod_spec(workload)
    assert spec is not None
    sidecars = [c for c in spec.get("initContainers", []) if is_proxy_image(c.get("image"))]
    assert len(sidecars) == 1, "the proxy is an init container with restartPolicy: Always"
    assert sidecars[0].get("restartPolicy") == "Always"
    apps = [c for c in spec["containers"] if not is_proxy_image(c.get("image"))]
    assert apps, "and the application is a container of the same pod"
    # The application is told the proxy's address on the pod's loopback.
    urls = [
        str(variable["value"])
        for app in apps
        for variable in app.get("env", [])
        if "127.0.0.1:" in str(variable.get("value", ""))
    ]
    assert urls
    (proxy,) = proxies(KUBERNETES)
    assert all(url.endswith(f"127.0.0.1:{proxy.port}") for url in urls), urls
    # Service links would put SOBOT_PROXY_PORT=tcp://... into the environment.
    assert spec.get("enableServiceLinks") is False


def test_kubernetes_probes_reach_the_proxy_on_its_port():
    (proxy,) = proxies(KUBERNETES)
    container = proxy.spec
    expected = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
    }
    for probe_name, path in expected.items():
        host, port, called = probe_target(container[probe_name], container)
        assert (port, called) == (proxy.port, path), probe_name
        if host == "pod-ip":
            # An httpGet probe connects to the pod's IP: a proxy on loopback is not there.
            assert not ipaddress.ip_address(proxy.host).is_loopback, probe_name
        else:
            assert ipaddress.ip_address(host).is_loopback, probe_name
    assert proxy.port in [p["containerPort"] for p in container.get("ports", [])]


def secret_item_of(
    spec: dict[str, Any], proxy: Proxy, file: Path
) -> tuple[str, dict[str, Any]] | None:
    """(volume name, secret) of the Secret volume that mounts `file` into the proxy's container
    as one of its listed items; None if none does."""
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    for mount in proxy.spec.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is not None and file.is_relative_to(mount["mountPath"]):
            relative = str(file.relative_to(mount["mountPath"]))
            if relative in [item["path"] for item in secret.get("items", [])]:
                return mount["name"], secret
    return None


def test_kubernetes_mounts_the_app_key_from_a_secret():
    (workload,) = kubernetes_workloads()
    spec = pod_spec(workload)
    assert spec is not None
    (proxy,) = proxies(KUBERNETES)
    found = secret_item_of(spec, proxy, Path(proxy.env["SOBOT_APP_KEY_FILE"]))
    assert found is not None
    volume, secret = found
    # Readable by the proxy's user: through fsGroup, or world-readable.
    mode = secret.get("defaultMode", 0o644)
    user = proxy.spec["securityContext"]["runAsUser"]
    assert mode & 0o004 or (mode & 0o040 and spec["securityContext"].get("fsGroup")), (mode, user)
    # The application's containers do not get it.
    for container in spec["containers"]:
        assert volume not in [m["name"] for m in container.get("volumeMounts", [])]


def test_kubernetes_grace_period_outlasts_the_proxys_shutdown():
    (workload,) = kubernetes_workloads()
    spec = pod_spec(workload)
    assert spec is not None
    (proxy,) = proxies(KUBERNETES)
    period = float(spec.get("terminationGracePeriodSeconds", 30))
    assert period > proxy.grace + CLOSE_SECONDS


def test_kubernetes_resources_match_the_measured_footprint():
    (proxy,) = proxies(KUBERNETES)
    resources = proxy.spec["resources"]
    assert quantity_mib(resources["requests"]["memory"]) >= IDLE_RSS_MIB
    assert quantity_mib(resources["limits"]["memory"]) >= LOADED_RSS_MIB
    assert resources["requests"]["cpu"]


def unshared_replicas(docs: list[dict[str, Any]]) -> list[str]:
    """The workloads of several replicas whose proxies do not share one token through Redis
    (each would fetch its own, and every get_token invalidates the one before)."""
    unshared = []
    for workload in docs:
        if pod_spec(workload) is None or workload["spec"].get("replicas", 1) <= 1:
            continue
        stores = [p.env.get("SOBOT_TOKEN_STORE", "memory") for p in proxies_in([workload], "")]
        assert stores, "a workload with a proxy"
        if any(urlsplit(store).scheme not in ("redis", "rediss") for store in stores):
            unshared.append(workload["metadata"]["name"])
    return unshared


def scaled_kubernetes(replicas: int, *, uncomment_redis: bool) -> list[dict[str, Any]]:
    """config/kubernetes.yaml with more replicas and, if asked, its commented-out Redis lines
    (the store, its password file, the Secret's item for it) taken in, as its comments say."""
    lines = KUBERNETES.read_text().splitlines()
    if uncomment_redis:
        start = re.compile(r"(\s*)# (- (name: SOBOT_TOKEN_STORE|key: redis_password).*)")
        for i, line in enumerate(lines):
            if match := start.fullmatch(line):
                lines[i] = match[1] + match[2]
                lines[i + 1] = re.sub(r"^(\s*)#   ", r"\1  ", lines[i + 1])  # its continuation
    docs = [doc for doc in yaml.safe_load_all("\n".join(lines)) if doc is not None]
    for doc in docs:
        if pod_spec(doc) is not None:
            doc["spec"]["replicas"] = replicas
    return docs


def test_kubernetes_runs_one_replica_with_the_token_in_memory():
    (workload,) = kubernetes_workloads()
    assert workload["spec"]["replicas"] == 1
    (proxy,) = proxies(KUBERNETES)
    assert proxy.env.get("SOBOT_TOKEN_STORE", "memory") == "memory"
    assert unshared_replicas(documents(KUBERNETES)) == []


def test_kubernetes_scaled_as_its_comments_say_shares_the_token_through_redis(tmp_path):
    docs = scaled_kubernetes(3, uncomment_redis=True)
    assert unshared_replicas(docs) == []
    (proxy,) = proxies_in(docs, KUBERNETES.name)
    settings = load_proxy_settings(proxy, tmp_path)
    assert urlsplit(settings.token_store).scheme == "redis"
    assert settings.token_store_password == "placeholder-secret"
    # The password file is an item of the proxy's mounted Secret, as the app_key is.
    (workload,) = [doc for doc in docs if pod_spec(doc) is not None]
    spec = pod_spec(workload)
    assert spec is not None
    for name in ("SOBOT_APP_KEY_FILE", "SOBOT_TOKEN_STORE_PASSWORD_FILE"):
        assert secret_item_of(spec, proxy, Path(proxy.env[name])) is not None, name


def test_the_replica_check_catches_replicas_raised_without_a_shared_store():
    assert unshared_replicas(scaled_kubernetes(3, uncomment_redis=False)) == ["my-app"]


def test_kubernetes_proxy_runs_locked_down():
    (proxy,) = proxies(KUBERNETES)
    context = proxy.spec["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert "/tmp" in [mount["mountPath"] for mount in proxy.spec["volumeMounts"]]


# --- Compose ----------------------------------------------------------------------------------


def seconds(duration: object) -> float:
    """A Compose duration: 30s, 1m30s, 1m, 500ms."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration))
    assert "".join(n + u for n, u in parts) == str(duration), duration
    assert parts, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def compose_services(path: Path) -> dict[str, dict[str, Any]]:
    (doc,) = documents(path)
    return dict(doc["services"])


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_REDIS], ids=lambda path: path.name)
def test_compose_applications_share_a_proxys_network_namespace(path):
    services = compose_services(path)
    proxy_names = {proxy.name for proxy in proxies(path)}
    apps = {
        name: service
        for name, service in services.items()
        if not is_proxy_image(service.get("image")) and "redis" not in str(service.get("image"))
    }
    assert apps
    namespaces = [str(service.get("network_mode")) for service in apps.values()]
    assert all(mode.startswith("service:") for mode in namespaces), namespaces
    owners = [mode.removeprefix("service:") for mode in namespaces]
    assert sorted(owners) == sorted(proxy_names), "one application per proxy, one proxy each"
    for name, service in apps.items():
        owner = service["network_mode"].removeprefix("service:")
        assert owner in service.get("depends_on", {}), name
        assert "ports" not in service, "a namespace's ports are published by its owner"


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_REDIS], ids=lambda path: path.name)
def test_compose_gives_the_app_key_as_a_secret_file(path):
    (doc,) = documents(path)
    found = proxies(path)
    assert found
    for proxy in found:
        key_file = proxy.env["SOBOT_APP_KEY_FILE"]
        assert key_file.startswith("/run/secrets/"), proxy.name
        # A secret is listed by name, or as {source, target}; it is mounted at its target.
        given = {
            (s, s) if isinstance(s, str) else (s.get("target", s["source"]), s["source"])
            for s in proxy.spec["secrets"]
        }
        sources = [source for target, source in given if f"/run/secrets/{target}" == key_file]
        assert len(sources) == 1, proxy.name
        assert "file" in doc["secrets"][sources[0]]


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_REDIS], ids=lambda path: path.name)
def test_compose_stop_grace_period_outlasts_the_proxys_shutdown(path):
    found = proxies(path)
    assert found
    for proxy in found:
        period = seconds(proxy.spec.get("stop_grace_period", f"{DOCKER_STOP_TIMEOUT:g}s"))
        assert period > proxy.grace + CLOSE_SECONDS, proxy.name


def healthcheck_problems(proxy: Proxy) -> list[str]:
    """What keeps a Compose proxy's healthcheck from telling its application when to start."""
    check = proxy.spec.get("healthcheck")
    if check is None or check.get("disable"):
        return ["no healthcheck: the image's first one comes after 15 s"]
    problems = []
    argv = probe_argv(check["test"])
    if argv[0] not in IMAGE_PROGRAMS:
        problems.append(f"{argv[0]} is not in the image")
    if not re.search(rf"127\.0\.0\.1:{proxy.port}/(healthz|readyz)\b", " ".join(argv)):
        problems.append(f"does not call /healthz or /readyz on 127.0.0.1:{proxy.port}")
    if seconds(check.get("start_interval", check.get("interval", "30s"))) > 2:
        problems.append("not polled every second or two while starting")
    return problems


def probe_argv(test: str | list[str]) -> list[str]:
    """The command a Compose healthcheck `test` runs."""
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    if test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", test[1]]
    assert test[0] == "CMD", test
    return list(test[1:])


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_REDIS], ids=lambda path: path.name)
def test_compose_health_checks_call_the_proxy_on_its_port_often_while_starting(path):
    found = proxies(path)
    assert found
    for proxy in found:
        assert healthcheck_problems(proxy) == [], proxy.name


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda check: check.clear(), "no healthcheck"),
        (lambda check: check.update(disable=True), "no healthcheck"),
        (lambda check: check.update(test=["CMD", "curl", "-f", CURL_URL]), "not in the image"),
        (lambda check: check.update(test=["CMD-SHELL", f"wget -qO- {CURL_URL}"]), "not in the"),
        (lambda check: check.update(test=broken_port(check["test"])), "does not call"),
        (lambda check: check.pop("start_interval"), "not polled"),
    ],
    ids=["missing", "disabled", "curl", "wget", "another-port", "slow-start"],
)
def test_the_health_check_check_catches_a_broken_example(change, problem):
    (proxy,) = proxies(COMPOSE)
    broken = copy.deepcopy(proxy.spec)
    change(broken["healthcheck"])
    if not broken["healthcheck"]:
        del broken["healthcheck"]
    problems = healthcheck_problems(dataclasses.replace(proxy, spec=broken))
    assert len(problems) == 1, problems
    assert problem in problems[0]


def broken_port(test: list[str]) -> list[str]:
    return [part.replace("127.0.0.1:8080", "127.0.0.1:9090") for part in test]


# --- every probe, run against a real proxy -------------------------------------------------------


@dataclass
class Probe:
    """A health or readiness probe of an example: the command, run inside the proxy's container."""

    where: str
    argv: list[str]
    port: int  # the port the proxy listens on there


def all_probes() -> list[Probe]:
    healthcheck = dict(dockerfile_instructions())["HEALTHCHECK"]
    probes = [Probe("Dockerfile", json.loads(healthcheck.split(" CMD ", 1)[1]), DEFAULT_PORT)]
    for proxy in all_proxies():
        if "healthcheck" in proxy.spec:
            probes.append(
                Probe(proxy_id(proxy), probe_argv(proxy.spec["healthcheck"]["test"]), proxy.port)
            )
        for name in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "exec" in proxy.spec.get(name, {}):
                argv = list(proxy.spec[name]["exec"]["command"])
                probes.append(Probe(f"{proxy_id(proxy)}:{name}", argv, proxy.port))
    return probes


async def run_probe(probe: Probe, port: int) -> int:
    """The exit status of `probe` run here, against a proxy on 127.0.0.1:`port`: the image's
    python is this one, and the port the example gives it is `port`."""
    assert probe.argv[0] in IMAGE_PROGRAMS, probe.argv
    argv = [sys.executable if probe.argv[0] == "python" else probe.argv[0], *probe.argv[1:]]
    argv = [arg.replace(f"127.0.0.1:{probe.port}", f"127.0.0.1:{port}") for arg in argv]
    env = {"PATH": os.environ["PATH"], "SOBOT_PROXY_PORT": str(port)}  # the Dockerfile's
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    async with asyncio.timeout(15):
        return await process.wait()


def test_every_example_has_probes_to_run():
    wheres = [probe.where for probe in all_probes()]
    assert "Dockerfile" in wheres
    assert {where.split(":")[0] for where in wheres} == {
        "Dockerfile",
        *(path.name for path in EXAMPLES),
    }


async def probe_outcomes(probe: Probe, proxy: TestClient[Any, Any]) -> tuple[int, int]:
    """`probe`'s exit status against a serving proxy, and against a port nobody listens on."""
    assert (await proxy.get("/api/echo")).status == 200  # a token is held: /readyz says ready
    assert proxy.port is not None
    serving = await run_probe(probe, proxy.port)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        free = closed.getsockname()[1]
    return serving, await run_probe(probe, free)


@pytest.mark.parametrize("probe", all_probes(), ids=lambda probe: probe.where)
async def test_every_probe_passes_against_a_serving_proxy_and_fails_without_one(probe, proxy):
    # 1: Python's status for the exception urllib raises when nobody answers.
    assert await probe_outcomes(probe, proxy) == (0, 1)


@pytest.mark.parametrize(
    ("change", "outcomes"),
    [
        (lambda argv: [arg.replace("/healthz", "/healthzz") for arg in argv], (1, 1)),
        (lambda argv: [arg.replace("urllib.request", "urllib.requests") for arg in argv], (1, 1)),
        (lambda argv: ["python", "-c", "print('http://127.0.0.1:8080/healthz')"], (0, 0)),
    ],
    ids=["wrong-path", "typo", "never-calls"],
)
async def test_the_probe_run_catches_a_broken_probe(proxy, change, outcomes):
    (proxy_of_compose,) = proxies(COMPOSE)
    (probe,) = [p for p in all_probes() if p.where == proxy_id(proxy_of_compose)]
    broken = dataclasses.replace(probe, argv=change(probe.argv))
    assert await probe_outcomes(broken, proxy) == outcomes  # not (0, 1): caught


def test_compose_without_redis_runs_one_proxy_with_the_token_in_memory():
    (proxy,) = proxies(COMPOSE)
    assert proxy.env.get("SOBOT_TOKEN_STORE", "memory") == "memory"
    assert proxy.spec.get("deploy", {}).get("replicas", 1) == 1


def test_compose_redis_proxies_share_one_token_through_the_redis_service():
    services = compose_services(COMPOSE_REDIS)
    found = proxies(COMPOSE_REDIS)
    assert len(found) >= 2, "several replicas"
    assert len({proxy.env["SOBOT_APPID"] for proxy in found}) == 1
    stores = {proxy.env.get("SOBOT_TOKEN_STORE", "memory") for proxy in found}
    assert len(stores) == 1, "one store for every replica"
    url = urlsplit(stores.pop())
    assert url.scheme in ("redis", "rediss")
    assert url.hostname in services, f"{url.hostname} is not a service of the file"
    assert "redis" in services[url.hostname]["image"]
    for proxy in found:
        assert url.hostname in proxy.spec.get("depends_on", {}), proxy.name
        # A network in common with Redis.
        redis_networks = set(services[url.hostname].get("networks", ["default"]))
        assert redis_networks & set(proxy.spec.get("networks", ["default"])), proxy.name


def test_kubernetes_temp_volume_holds_the_proxys_spool_limit(tmp_path):
    """Spooled bodies in an emptyDir past its sizeLimit get the pod evicted: the limit the
    proxy would load from its environment must fit the volume at SOBOT_TEMP_DIR, with room
    to spare."""
    (workload,) = kubernetes_workloads()
    (proxy,) = proxies(KUBERNETES)
    spec = pod_spec(workload)
    assert spec is not None
    mounts = [
        m for m in proxy.spec["volumeMounts"] if m["mountPath"] == proxy.env["SOBOT_TEMP_DIR"]
    ]
    [volume] = [v for v in spec["volumes"] if v["name"] == mounts[0]["name"]]
    env = {**proxy.env, "SOBOT_TEMP_DIR": str(tmp_path), "SOBOT_APP_KEY": "placeholder"}
    del env["SOBOT_APP_KEY_FILE"]
    spool_limit_mib = load_settings({}, env).spool_limit / 2**20
    assert spool_limit_mib <= 0.75 * quantity_mib(volume["emptyDir"]["sizeLimit"])
