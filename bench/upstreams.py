"""The servers a benchmark runs: nginx in three roles, the fake Sobot, and sobot-proxy itself.

nginx as the upstream answers `get_token` with a fixed token good for a day, and every other
`/api/` path with one small fixed Sobot answer, as fast as anything on this machine can; a
request without the token gets 401 (with Sobot's 900002 body), so a setup that fails to inject
it shows up as wrk's non-2xx count, never as a fast wrong answer.

nginx as the anchor is a plain `proxy_pass` reverse proxy injecting the same `token` header,
with kept-alive upstream connections, one worker, and a JSON access-log line per request
(unbuffered, to a file), because sobot-proxy in production writes one too.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.system import (
    START_TIMEOUT,
    THIS_CHECKOUT,
    BenchError,
    Checkout,
    Process,
    child_env,
    on_cpus,
    python_module,
    require_tools,
    wait_for_status,
)

APPID: Final = "bench-appid"
APP_KEY: Final = "bench-app-key-0123456789"
TOKEN: Final = "4ac37cb2e9c740dba4b75a34d5358802"  # the vendor's documented example token
API_PATH: Final = "/api/ws/5/ticket/list?page=1"
TOKEN_ANSWER: Final = (
    '{"item":{"token":"' + TOKEN + '","expires_in":"86400"},'
    '"ret_code":"000000","ret_msg":"Success"}'
)
# The size and shape of a small real answer: one ticket of a ticket list.
API_ANSWER: Final = (
    '{"ret_code":"000000","ret_msg":"success","item":{"total":1,"page_no":1,"page_size":15,'
    '"list":[{"ticketid":"8c1f0b2e6a4d4f0e9b7c3d2a1e5f6a7b","ticket_title":"Printer offline",'
    '"ticket_status":1,"ticket_level":2,"create_time":"1700000000",'
    '"customerid":"c9e2a0d1b3f44e5a8c6d7e8f9a0b1c2d","deal_agent_name":"Mina"}]}}'
)
EXPIRED_ANSWER: Final = '{"ret_code":"900002","ret_msg":"token has expired, obtain a new one"}'


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    process: Process
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.stop()


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca: Path  # what a client trusts
    cert: Path  # the server's chain
    key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA and a certificate for 127.0.0.1 it signed."""
    try:
        import trustme
    except ImportError as exc:
        raise BenchError("trustme is missing: install the test extras ('.[test]')") from exc
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    files = TlsFiles(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    ca.cert_pem.write_to_path(str(files.ca))
    files.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(files.key))
    files.key.chmod(0o600)
    return files


# --- nginx -----------------------------------------------------------------------------------


def _nginx_conf(directory: Path, servers: str) -> str:
    d = directory
    return f"""
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy_temp;
    fastcgi_temp_path {d}/fastcgi_temp;
    uwsgi_temp_path {d}/uwsgi_temp;
    scgi_temp_path {d}/scgi_temp;
    access_log off;
    server_tokens off;
    keepalive_timeout 75s;
    # nginx closes a kept-alive connection after 1000 requests by default: not what is measured.
    keepalive_requests 1000000;
{servers}
}}
"""


def _api_locations() -> str:
    return f"""
        default_type application/json;
        location = /api/get_token {{ return 200 '{TOKEN_ANSWER}'; }}
        location /api/ {{
            if ($http_token != "{TOKEN}") {{ return 401 '{EXPIRED_ANSWER}'; }}
            return 200 '{API_ANSWER}';
        }}
        location / {{ return 404; }}"""


def _start_nginx(name: str, directory: Path, servers: str, cpus: str | None) -> Process:
    nginx = require_tools("nginx")["nginx"]
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(_nginx_conf(directory, servers))
    argv = [nginx, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)]
    argv += ["-g", "daemon off;"]
    return Process(name, on_cpus(cpus, argv), log_path=directory / "output.log", env=child_env())


def start_upstream(
    directory: Path, port: int, *, cpus: str | None, tls: TlsFiles | None = None
) -> Server:
    """nginx as a fast Sobot: plain http on `port`, or https with `tls`."""
    listen = f"listen 127.0.0.1:{port}"
    if tls is not None:
        listen += f""" ssl;
        ssl_certificate {tls.cert};
        ssl_certificate_key {tls.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:bench:1m"""
    servers = f"""
    server {{
        {listen};
{_api_locations()}
    }}"""
    process = _start_nginx("nginx upstream", directory, servers, cpus)
    server = Server("nginx upstream", process, port)
    if tls is None:
        wait_for_status(process, port, "/api/get_token")
    else:
        _wait_for_tls(process, port)
    return server


def start_nginx_proxy(
    directory: Path, port: int, upstream_port: int, *, cpus: str | None
) -> Server:
    """nginx as a plain reverse proxy injecting the token: the native anchor."""
    servers = f"""
    log_format bench escape=json '{{"time":"$time_iso8601","method":"$request_method",'
        '"path":"$uri","status":$status,"duration_ms":$request_time,'
        '"upstream_ms":"$upstream_response_time"}}';
    upstream sobot {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        access_log {directory}/access.log bench;
        location /api/ {{
            proxy_pass http://sobot;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header token "{TOKEN}";
        }}
        location / {{ return 404; }}
    }}"""
    process = _start_nginx("nginx proxy", directory, servers, cpus)
    wait_for_status(process, port, API_PATH)
    return Server("nginx proxy", process, port)


def _wait_for_tls(process: Process, port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        process.check_alive()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{process.name}: port {port} not open within 10 s\n{process.tail()}")


# --- Python servers --------------------------------------------------------------------------


def start_fake_sobot(
    directory: Path, port: int, *, cpus: str | None = None, companies: Path | None = None
) -> Server:
    """The package's fake Sobot: the upstream that can stream a download of any size, and
    serve many companies (`companies`: a file of `appid app_key` lines) besides APPID's."""
    directory.mkdir(parents=True, exist_ok=True)
    argv = python_module(
        "proxy", "fake-sobot", "--port", str(port), "--appid", APPID, "--app-key", APP_KEY
    )
    if companies is not None:
        argv += ["--companies-file", str(companies)]
    process = Process("fake sobot", on_cpus(cpus, argv), log_path=directory / "fake-sobot.log")
    wait_for_status(process, port, "/_fake/stats")
    return Server("fake sobot", process, port)


def start_sobot_proxy(
    directory: Path,
    port: int,
    upstream_url: str,
    *,
    cpus: str | None,
    workers: int = 1,
    name: str = "sobot-proxy",
    checkout: Checkout = THIS_CHECKOUT,
    poll: float = 0.05,
    timeout: float = START_TIMEOUT,
    **settings: str,
) -> Server:
    """`python -m proxy serve` from `checkout`, production settings (JSON logs on), once ready
    (asked every `poll` seconds). `settings`: environment variables, over the defaults here."""
    directory.mkdir(parents=True, exist_ok=True)
    defaults = {
        "SOBOT_APPID": APPID,
        "SOBOT_APP_KEY": APP_KEY,
        "SOBOT_BASE_URL": upstream_url,
        "SOBOT_PROXY_PORT": str(port),
        "SOBOT_PROXY_WORKERS": str(workers),
        "SOBOT_LOG_FORMAT": "json",
        "SOBOT_LOG_LEVEL": "info",
    }
    env = child_env(**(defaults | settings))
    argv = on_cpus(cpus, python_module("proxy", "serve", python=checkout.python))
    # `-m` puts the working directory first on sys.path: the checkout's own proxy/ runs,
    # whatever its venv has installed.
    process = Process(name, argv, log_path=directory / f"{name}.log", env=env, cwd=checkout.root)
    try:
        # Each worker binds the port itself: all of them, not just the first, must listen.
        deadline = time.monotonic() + timeout
        while process.log_path.read_text(errors="replace").count('"event":"listening"') < workers:
            process.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{name}: not listening within {timeout} s\n{process.tail()}")
            time.sleep(poll)
        wait_for_status(process, port, "/readyz", poll=poll, timeout=timeout)
    except BaseException:
        process.stop()  # not left running when it never became a server to stop
        raise
    return Server(name, process, port)
