"""The `sobot-proxy` command: `serve` (the default), `check` and `fake-sobot`.

Configuration mistakes stop start-up with one line per problem on stderr and exit status 2;
`check` reports them the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Final, NoReturn

from aiohttp import web

from proxy import __version__
from proxy.cli import check, prove
from proxy.cli.startup import announce
from proxy.cli.workers import (
    WORKER_ENV,
    WORKERS_DIRECTORY_ENV,
    die_with_the_supervisor,
    supervise,
)
from proxy.config.routes import CredentialSettings, RouteSettings
from proxy.config.settings import (
    APP_KEY_ENV,
    APP_KEY_FILE_ENV,
    CONFIG_ENV,
    LOG_FORMATS,
    LOG_LEVELS,
    OPTIONS,
    ConfigError,
    Settings,
    is_loopback,
    load_settings,
    load_with_provenance,
)
from proxy.logs import configure_logging, get_logger
from proxy.server import hangups
from proxy.server.app import API, CONNECTIONS, TENANTS, make_app
from proxy.server.connections import raise_open_files_limit
from proxy.server.listen import run, serve
from proxy.testing.fake_sobot import FakeSobot, read_companies
from proxy.tokens.store import describe_store

DEMO_APPID: Final = "demo-appid"
DEMO_APP_KEY: Final = "demo-app-key"
# The demo's V6 call centre: a credential set of its own, on a route of its own.
DEMO_V6 = CredentialSettings("callcenter", "v6", "demo-v6-appid", "demo-v6-secret")
DEMO_V6_ROUTE = RouteSettings("/callservice/", None, DEMO_V6.name)
# In demo mode these come from the demo, whatever the environment says.
_DEMO_IGNORED_ENV: Final = frozenset(
    {"SOBOT_APPID", APP_KEY_ENV, APP_KEY_FILE_ENV, "SOBOT_REGION", "SOBOT_BASE_URL"}
)
EXIT_CONFIG: Final = 2
EXIT_CRASH: Final = 1


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors never repeat argument values.

    `sobot-proxy --app-key SECRET` must not print SECRET back: only option names are shown.
    """

    def error(self, message: str) -> NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            words = message.removeprefix(prefix).split()
            names = [word.split("=", 1)[0] for word in words if word.startswith("-")]
            message = prefix + (" ".join(names) or "(values not shown)")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sobot-proxy",
        description="Authenticating reverse proxy for the Sobot Open APIs (v5 and the V6 call "
        "centre).",
    )
    parser.add_argument("--version", action="version", version=f"sobot-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    serve_cmd = commands.add_parser(
        "serve",
        help="run the proxy (the default command)",
        description="Run the proxy. The app_key is read from SOBOT_APP_KEY or "
        "SOBOT_APP_KEY_FILE only, never from a flag, so it stays out of `ps`.",
    )
    _add_setting_arguments(serve_cmd)
    serve_cmd.add_argument(
        "--demo",
        action="store_true",
        help="run against an in-process fake Sobot with demo credentials, to try the proxy",
    )

    check_cmd = commands.add_parser(
        "check",
        help="validate a configuration without starting the proxy, and say what it would use",
        description="Validate the configuration serve would load (same flags, environment and "
        "file) and print, one line per setting, the value that would be used and where it came "
        f"from ({check.PRECEDENCE}). Secrets are never shown. Exit status: 0 valid (and, with "
        "--online, proven), 1 credentials refused or Sobot or the token store unreachable, "
        "2 configuration or usage problem.",
    )
    _add_setting_arguments(check_cmd)
    check_cmd.add_argument(
        "--online",
        action="store_true",
        help="prove each credential set works: with a Redis token store holding its token, by "
        "that shared token (the token call is not made); otherwise by its token call "
        "(get_token, /tokens/company), only with --rotate-token",
    )
    check_cmd.add_argument(
        "--rotate-token",
        action="store_true",
        help="allow --online to make token calls (get_token, /tokens/company), which issue a new "
        "token and may invalidate the one every running proxy (and any other client) of the "
        "appid holds",
    )
    check_cmd.add_argument(
        "--probe-path",
        metavar="PATH",
        type=check.probe_path,
        help="with --online, a read-only GET API (with its query) to send a token to, proving "
        "Sobot accepts it: the token of its route's credential set; for example one your "
        "application already calls",
    )

    fake_cmd = commands.add_parser(
        "fake-sobot",
        help="run a fake Sobot upstream, for development without credentials",
    )
    fake_cmd.add_argument(
        "--host", default="127.0.0.1", help="address to listen on [default: %(default)s]"
    )
    fake_cmd.add_argument(
        "--port", type=int, default=8081, help="port to listen on [default: %(default)s]"
    )
    # A test tool: its secrets may be on the command line, unlike the proxy's.
    fake_cmd.add_argument(
        "--appid",
        default=DEMO_APPID,
        help="the v5 company's appid, which get_token accepts [default: %(default)s]",
    )
    fake_cmd.add_argument(
        "--app-key",
        default=DEMO_APP_KEY,
        help="that company's app_key, which get_token's sign must be made with (a fake's key: "
        "fine on the command line, unlike the proxy's) [default: %(default)s]",
    )
    fake_cmd.add_argument(
        "--token-lifetime", type=float, default=86400.0, help="expires_in of issued tokens"
    )
    fake_cmd.add_argument("--v6-appid", help="serve the V6 call centre with this appId")
    fake_cmd.add_argument("--v6-secret", help="the V6 app_secret (with --v6-appid)")
    fake_cmd.add_argument(
        "--v6-token-lifetime", type=float, default=86400.0, help="lifetime of issued V6 tokens"
    )
    fake_cmd.add_argument(
        "--companies-file",
        metavar="FILE",
        type=companies_file,
        help="more v5 companies to serve, one `appid app_key` a line (blank and # lines skipped)",
    )
    fake_cmd.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="the lowest level logged [default: %(default)s]",
    )
    fake_cmd.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="json",
        help="json (one object a line) or console [default: %(default)s]",
    )
    return parser


def companies_file(path: str) -> dict[str, str]:
    """`fake-sobot --companies-file`: the companies it names, or a usage error saying why."""
    try:
        return read_companies(path)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and a flag for every option that has one, as serve and check both take them."""
    parser.add_argument(
        "--config", metavar="FILE", help=f"TOML configuration file (or {CONFIG_ENV})"
    )
    for option in OPTIONS:
        if option.flag and option.switch:
            parser.add_argument(
                option.flag,
                dest=option.name,
                action="store_const",
                const=True,
                default=None,
                help=f"{option.help} [{option.env}=1]",
            )
        elif option.flag:
            parser.add_argument(
                option.flag,
                dest=option.name,
                metavar=option.name.upper(),
                default=None,
                help=f"{option.help} [{option.env}]",
            )


def _flags(args: argparse.Namespace) -> dict[str, object]:
    """The option flags given (None where not), and "config", as load_settings takes them."""
    flags: dict[str, object] = {option.name: getattr(args, option.name) for option in OPTIONS}
    flags["config"] = args.config
    return flags


def _report_problems(problems: Sequence[str]) -> int:
    for problem in problems:
        print(f"sobot-proxy: configuration error: {problem}", file=sys.stderr)
    return EXIT_CONFIG


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    # `serve` is the default command: `sobot-proxy --port 9000` serves.
    if not arguments or (
        arguments[0].startswith("-") and arguments[0] not in ("-h", "--help", "--version")
    ):
        arguments.insert(0, "serve")
    parser = build_parser()
    args = parser.parse_args(arguments)
    if args.command == "fake-sobot":
        if (args.v6_appid is None) != (args.v6_secret is None):
            parser.error("--v6-appid and --v6-secret go together")
        return _run_fake(args)
    if args.command == "check":
        if not args.online and (args.rotate_token or args.probe_path):
            parser.error("--rotate-token and --probe-path go with check --online")
        return _run_check(args, os.environ)
    return _run_serve(args, os.environ, arguments)


def _run_check(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    try:
        settings, provenance = load_with_provenance(_flags(args), environ)
    except ConfigError as exc:
        return _report_problems(exc.problems)
    print(f"sobot-proxy check: the configuration is valid; in force ({check.PRECEDENCE}):")
    print("\n".join(check.describe(settings, provenance)), flush=True)
    print("\n".join(check.describe_tenants(settings)), flush=True)
    print("\n".join(check.describe_routes(settings)), flush=True)
    for warning in check.warnings(settings, provenance):
        print(f"sobot-proxy: warning: {warning}", file=sys.stderr)
    if not args.online:
        return prove.EXIT_OK
    problem = None if args.probe_path is None else prove.probe_problem(settings, args.probe_path)
    if problem is not None:
        print(f"sobot-proxy check: --probe-path {args.probe_path}: {problem}", file=sys.stderr)
        return prove.EXIT_USAGE
    return prove.prove(
        settings,
        rotate_token=args.rotate_token,
        probe=args.probe_path,
        out=sys.stdout,
        err=sys.stderr,
    )


def _run_serve(
    args: argparse.Namespace, environ: Mapping[str, str], arguments: Sequence[str]
) -> int:
    # A hang-up while starting is noted, and answered by one reload once the proxy can reload
    # (server/hangups.py): the configuration about to be read may be the old one by then.
    hangups.note_early()
    flags = _flags(args)
    env = dict(environ)
    demo_socket = None
    if args.demo:
        demo_socket = socket.create_server(("127.0.0.1", 0))
        env = {k: v for k, v in env.items() if k not in _DEMO_IGNORED_ENV}
        env[APP_KEY_ENV] = DEMO_APP_KEY
        flags.update(
            appid=DEMO_APPID,
            region=None,
            base_url=f"http://127.0.0.1:{demo_socket.getsockname()[1]}",
        )

    def load() -> Settings:
        """The configuration as flags, environment and files give it: at start-up, and again
        on each SIGHUP (server/reload.py)."""
        settings = load_settings(flags, env)
        if args.demo and settings.workers > 1:
            raise ConfigError(["--demo runs one process: --workers must be 1 with it"])
        if args.demo:
            settings = dataclasses.replace(
                settings,
                credentials=(*settings.credentials, DEMO_V6),
                routes=(*settings.routes, DEMO_V6_ROUTE),
            )
        return settings

    try:
        settings = load()
    except ConfigError as exc:
        if demo_socket is not None:
            demo_socket.close()
        return _report_problems(exc.problems)

    secrets = configure_logging(settings.log_level, settings.log_format)
    log = get_logger()
    if (
        settings.allow_unauthenticated
        and not settings.client_keys
        and not is_loopback(settings.host)
    ):
        log.warning(
            "unauthenticated",
            host=settings.host,
            detail="no client keys: anyone who reaches this address acts as your Sobot company",
        )
    if settings.workers > 1:
        return supervise(arguments, settings, log)
    workers_directory = environ.get(WORKERS_DIRECTORY_ENV)
    if workers_directory is not None:
        die_with_the_supervisor()
    open_files_limit = raise_open_files_limit()
    app = make_app(
        settings,
        secrets=secrets,
        workers_directory=workers_directory,
        open_files_limit=open_files_limit,
        reload_with=load,
    )
    if demo_socket is not None:
        app.cleanup_ctx.insert(0, _demo_upstream(demo_socket))
    token_store = describe_store(settings.token_store, workers_directory=workers_directory)

    async def on_listening(host: str, port: int) -> None:
        if demo_socket is not None:
            log.info(
                "demo",
                hint=f"try: curl http://{host}:{port}/api/echo?hello=world (v5) and "
                f"curl http://{host}:{port}/callservice/v6/echo (V6)",
            )
        default = app[TENANTS].default  # as it is now: a reload may have come first
        await announce(
            default.sets,
            default.routes,
            settings,
            log,
            url=f"http://{host}:{port}",
            worker=environ.get(WORKER_ENV),
            token_store=token_store,
        )

    try:
        return run(
            serve(
                app,
                host=settings.host,
                port=settings.port,
                shutdown_grace=settings.shutdown_grace,
                reuse_port=workers_directory is not None,
                log=log,
                connections=app[CONNECTIONS],
                on_listening=on_listening,
                drain=lambda grace: app[API].drain(grace),
                busy=lambda: app[API].others_in_flight(),
                upstream=settings.base_url,
                token_store=token_store,
                open_files_limit=open_files_limit,
                demo=args.demo,
            )
        )
    except Exception:
        # Through the logs, so the traceback is scrubbed of secrets like every other line.
        log.exception("crashed")
        return EXIT_CRASH


def _demo_upstream(
    sock: socket.socket,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Start a fake Sobot on an already bound socket before the proxy starts."""

    async def context(_app: web.Application) -> AsyncIterator[None]:
        fake = FakeSobot(DEMO_APPID, DEMO_APP_KEY, v6_appid=DEMO_V6.appid, v6_secret=DEMO_V6.secret)
        runner = fake.make_runner()
        await runner.setup()
        await web.SockSite(runner, sock).start()
        try:
            yield
        finally:
            await runner.cleanup()

    return context


def _run_fake(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    log = get_logger()
    fake = FakeSobot(
        args.appid,
        args.app_key,
        v6_appid=args.v6_appid,
        v6_secret=args.v6_secret,
        token_lifetime=args.token_lifetime,
        v6_token_lifetime=args.v6_token_lifetime,
        companies=args.companies_file,
    )
    app = fake.make_app()
    return run(
        serve(app, host=args.host, port=args.port, shutdown_grace=1.0, log=log, role="fake-sobot")
    )
