"""Command line: ``shardproxy run | check | plan | status | demo | version``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import tomli_w
import trio

from shardproxy import __version__, config
from shardproxy.config import Config, ConfigError, certs
from shardproxy.control import addrplan
from shardproxy.control.addrplan import Plan
from shardproxy.control.supervisor import StartError, Supervisor
from shardproxy.demo.echo import serve_echo
from shardproxy.host import runtime, tls
from shardproxy.telemetry import logs, status

DEMO_PORT = 8080


@contextmanager
def _exit_on_config_error() -> Iterator[None]:
    """A config error ends the command with its one line on stderr, exit 1."""
    try:
        yield
    except ConfigError as e:
        print(f"shardproxy: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def _load(path: str) -> Config:
    with _exit_on_config_error():
        return config.load(path)


def _plan(cfg: Config) -> Plan:
    with _exit_on_config_error():
        return addrplan.build(cfg)


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    with _exit_on_config_error():
        tls.trial(cfg)  # what only OpenSSL can tell: ciphers, keys it can use
    _plan(cfg)  # what only this host can tell: source addresses, system port range
    for line in certs.expiry_warnings(cfg):
        print(f"shardproxy: warning: {line}", file=sys.stderr)
    print(f"# {args.config}: OK. Effective configuration (defaults filled in):")
    for key, info in certs.profile_certificates(cfg):
        names = ", ".join(info.names)
        print(f"# {key}: {info.path}: names {names}; {certs.expiry_note(info)}")
    print(tomli_w.dumps(cfg.to_dict()), end="")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    plan = _plan(_load(args.config))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(addrplan.describe(plan))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    try:
        if args.once:
            print(status.once(cfg, args.interval))
        else:
            status.watch(cfg, args.interval)
    except status.StatusError as e:
        print(f"shardproxy: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    try:
        stream = logs.open_stream(cfg.log.file)
    except OSError as e:
        print(
            f"shardproxy: {cfg.source}: log.file: cannot open {cfg.log.file}: {e.strerror}",
            file=sys.stderr,
        )
        return 1
    logs.configure(cfg.log.level, {"process.name": "supervisor"}, stream)
    return _run_supervisor(cfg)


def _run_supervisor(cfg: Config) -> int:
    supervisor = Supervisor(cfg)
    try:
        supervisor.prepare()
    except StartError as e:
        print(f"shardproxy: {e}", file=sys.stderr)
        return 1
    trio.run(supervisor.run)
    return 0


def demo_config(backends: list[tuple[str, int]], port: int) -> Config:
    return config.from_mapping(
        {
            "proxy": {"listen": [f"127.0.0.1:{port}"]},
            "routes": [{"host": "*", "path_prefix": "/", "pool": "echo"}],
            "pools": {
                "echo": {
                    "balance": "round_robin",
                    "servers": [
                        {"name": f"echo-{i}", "address": host, "ports": [p]}
                        for i, (host, p) in enumerate(backends, 1)
                    ],
                }
            },
        },
        "<demo>",
    )


async def _demo(port: int) -> int:
    async with trio.open_nursery() as nursery:
        backends = [await nursery.start(serve_echo, "127.0.0.1", 0, f"echo-{i}") for i in (1, 2)]
        cfg = demo_config(backends, port)
        supervisor = Supervisor(cfg)
        try:
            supervisor.prepare()
        except StartError as e:
            print(f"shardproxy: {e} (try: shardproxy demo --port 8081)", file=sys.stderr)
            nursery.cancel_scope.cancel()
            return 1

        async def announce() -> None:
            await supervisor.ready.wait()
            print(
                f"shardproxy demo: ws://127.0.0.1:{port}/ → echo backends "
                f"{', '.join(f'{h}:{p}' for h, p in backends)} ({cfg.proxy.workers} workers). "
                f"Connect with (send 'whoami' to see which backend answers; Ctrl-C stops):\n"
                + runtime.websocket_client_command(f"ws://127.0.0.1:{port}/"),
                file=sys.stderr,
                flush=True,
            )

        nursery.start_soon(announce)
        await supervisor.run()
        nursery.cancel_scope.cancel()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    logs.configure(args.log_level, {"process.name": "supervisor"})
    return trio.run(_demo, args.port)


def cmd_version(args: argparse.Namespace) -> int:
    from shardproxy.engine import choice

    print(f"shardproxy {__version__}")
    print(f"engine: {choice.describe()}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shardproxy",
        description="WebSocket load balancer for very many concurrent websockets.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the proxy with a config file")
    run.add_argument("-c", "--config", required=True, help="TOML config file")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate a config file and print the effective config")
    check.add_argument("-c", "--config", required=True, help="TOML config file")
    check.set_defaults(func=cmd_check)
    plan = sub.add_parser(
        "plan", help="print the address plan: sources x ports x endpoints, and what limits it"
    )
    plan.add_argument("-c", "--config", required=True, help="TOML config file")
    plan.add_argument("--json", action="store_true", help="print it as JSON")
    plan.set_defaults(func=cmd_plan)
    st = sub.add_parser("status", help="a live view of the running instance (needs [admin] listen)")
    st.add_argument("-c", "--config", required=True, help="the instance's TOML config file")
    st.add_argument(
        "--once", action="store_true", help="print once (rates over --interval) and exit"
    )
    st.add_argument(
        "--interval", type=float, default=2.0, help="seconds between refreshes (and of the rates)"
    )
    st.set_defaults(func=cmd_status)
    demo = sub.add_parser(
        "demo", help="run on 127.0.0.1:8080 in front of two built-in echo backends"
    )
    demo.add_argument("--port", type=int, default=DEMO_PORT, help="listen port (default 8080)")
    demo.add_argument("--log-level", default="info", choices=config.LOG_LEVELS)
    demo.set_defaults(func=cmd_demo)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    raise SystemExit(args.func(args))
