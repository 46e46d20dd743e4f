"""The ``shieldproxy`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .config import format_errors
from .flows_cli import add_journal_commands, flows_from_journals


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(
            f"invalid freeze {text!r}: use a number of seconds between 0 and 3600"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shieldproxy",
        description="Acknowledge the TCP peers of a checkpointed container, then "
        "hand their bytes to the restored socket.",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (default WARNING)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    lab = sub.add_parser("lab", help="create or remove a network-namespace lab")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    up = lab_sub.add_parser("up", help="create peer, gateway and container namespaces")
    up.add_argument("--attacker", action="store_true", help="add an attacker namespace")
    up.add_argument(
        "--second-container",
        action="store_true",
        help="add a second container namespace (ctr2) behind the gateway",
    )
    up.add_argument(
        "--extra-peer-addresses", type=int, default=0, help="more peer addresses"
    )
    down = lab_sub.add_parser("down", help="remove a lab, also after a crash of up")
    target = down.add_mutually_exclusive_group(required=True)
    target.add_argument("lab_id", nargs="?", help="6-hex lab id printed by 'lab up'")
    target.add_argument("--all", action="store_true", help="remove every lab")

    demo = sub.add_parser(
        "demo", help="checkpoint a streaming connection with and without the shield"
    )
    demo.add_argument(
        "--config",
        type=Path,
        help="YAML file of demo settings (see config/demo.yaml); options override it",
    )
    demo.add_argument(
        "--freeze",
        type=_positive_seconds,
        help="seconds the connection stays checkpointed (default 20)",
    )
    demo.add_argument(
        "--ipv6", action="store_true", default=None, help="run the flow over IPv6"
    )
    demo.add_argument("--json", type=Path, help="also write the results to this file")
    demo.add_argument(
        "--keep", type=Path, help="keep dumps, captures and logs in this folder"
    )
    demo.add_argument(
        "--no-baseline",
        action="store_true",
        default=None,
        help="skip the run without the shield",
    )
    demo.add_argument(
        "--rate", type=int, help="peer send rate in bytes per second (default 4 MiB/s)"
    )

    check = sub.add_parser(
        "check-pcap", help="check a capture against the shield's invariants"
    )
    check.add_argument("args", nargs=argparse.REMAINDER, help="see check-pcap --help")
    _add_bench_command(sub)
    _add_daemon_commands(sub)
    return parser


def _add_bench_command(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="compare the shield with CRIU's drop lock in a lab (root, from a "
        "checkout)",
    )
    size = bench.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        dest="preset",
        action="store_const",
        const="quick",
        default="default",
        help="run a reduced set that takes under two minutes",
    )
    size.add_argument(
        "--long",
        dest="preset",
        action="store_const",
        const="long",
        help="add a 300 s freeze and the survival scenario (about an hour)",
    )
    bench.add_argument(
        "--out",
        type=Path,
        default=Path("results/bench"),
        help="folder for results.json, results.md and plots (default results/bench)",
    )
    bench.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help="run only this scenario (repeatable): resume_gap, survival, overhead, "
        "absorb, engage, handover, memory",
    )


DEFAULT_CONTROL_SOCKET = Path("/run/shieldproxy/control.sock")


def _add_daemon_commands(sub: Any) -> None:
    run = sub.add_parser("run", help="run the shield daemon from a YAML config file")
    run.add_argument("--config", type=Path, required=True, help="YAML config file")

    config = sub.add_parser("config", help="validate a config file or print its schema")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a config file and exit")
    check.add_argument("file", type=Path, help="YAML config file")
    config_sub.add_parser("schema", help="print the config file's JSON schema")

    def control(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        where = parser.add_mutually_exclusive_group()
        where.add_argument(
            "--socket",
            type=Path,
            help=f"daemon control socket (default {DEFAULT_CONTROL_SOCKET})",
        )
        where.add_argument(
            "--config", type=Path, help="take the control socket from this config"
        )
        return parser

    freeze = control("freeze", "divert a scope's peers to the shield")
    freeze.add_argument("--scope", required=True, help="scope name from the config")
    freeze.add_argument(
        "--dump",
        type=Path,
        action="append",
        default=[],
        help="socket dump file of a flow to answer for (repeatable)",
    )
    thaw = control("thaw", "hand a frozen scope's flows over, one file pair each")
    thaw.add_argument("--scope", required=True, help="scope name from the config")
    thaw.add_argument("--out", type=Path, required=True, help="folder for hand-overs")
    control("status", "show each scope's state and counters")
    flows = control(
        "flows",
        "list the daemon's shielded flows; 'flows list' and 'flows export' read "
        "its journals",
    )
    flows.add_argument("--scope", help="only this scope")
    add_journal_commands(flows)
    announce = control(
        "announce", "send restored sockets' windows, still holding packets"
    )
    announce.add_argument("--scope", required=True, help="scope name from the config")
    announce.add_argument(
        "--window",
        action="append",
        default=[],
        metavar="FLOW=RCV_NXT:RIGHT_EDGE",
        help="restored receive window of a flow, as 'shieldproxy flows' names it "
        "(repeatable)",
    )
    hook = control(
        "criu-hook",
        "CRIU action script: freeze, hand over and release a scope as CRIU dumps "
        "and restores the container",
    )
    hook.add_argument(
        "--scope", help="scope the container's flows are in (or SHIELDPROXY_SCOPE)"
    )
    release = control("release", "let held packets through and remove rules")
    release.add_argument("--scope", help="only this scope (default: all)")
    release.add_argument(
        "--force", action="store_true", help="also release scopes still frozen"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "lab":
        return _lab(args)
    if args.command == "demo":
        return _demo(args)
    if args.command == "run":
        return _run(args)
    if args.command == "config":
        from .config_cli import check_main, schema_main

        if args.config_command == "check":
            return check_main(args.file)
        return schema_main()
    if args.command == "flows" and args.flows_command is not None:
        return flows_from_journals(args)
    if args.command in ("freeze", "thaw", "status", "flows", "announce", "release"):
        return _control(args)
    if args.command == "criu-hook":
        return _criu_hook(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "check-pcap":
        from .pcapcheck import main as pcap_main

        return pcap_main(args.args)
    raise AssertionError(args.command)


def _run(args: argparse.Namespace) -> int:
    import trio

    from .config import ConfigError, ShieldConfig, load_config
    from .daemon import Daemon

    try:
        config = load_config(args.config, ShieldConfig)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    _setup_logging(config.logging.level, config.logging.format)
    daemon = Daemon(config, args.config)
    try:
        trio.run(daemon.run)
    except Exception as exc:
        logging.getLogger("shieldproxy").error("daemon failed: %s", exc)
        return 1
    return 0


def _setup_logging(level: str, style: str) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler()
    if style == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root.addHandler(handler)
    root.setLevel(level)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": self.formatTime(record),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def _criu_hook(args: argparse.Namespace) -> int:
    from .config import ConfigError, ShieldConfig, load_config
    from .criu.hook import hook_main

    socket_path = args.socket
    try:
        if args.config is not None:
            socket_path = load_config(args.config, ShieldConfig).control.socket_path
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    return hook_main(args.scope, socket_path)


def _control(args: argparse.Namespace) -> int:
    from .config import ConfigError, ShieldConfig, load_config
    from .control import ControlError, DaemonNotRunning, call

    socket_path = args.socket or DEFAULT_CONTROL_SOCKET
    try:
        if args.config is not None:
            socket_path = load_config(args.config, ShieldConfig).control.socket_path
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    request: dict[str, Any] = {"command": args.command}
    if args.command == "freeze":
        request.update(scope=args.scope, dumps=[str(p.resolve()) for p in args.dump])
    elif args.command == "thaw":
        request.update(scope=args.scope, out_dir=str(args.out.resolve()))
    elif args.command == "announce":
        try:
            windows = _parse_windows(args.window)
        except ValueError as exc:
            print(f"shieldproxy announce: {exc}", file=sys.stderr)
            return 2
        request.update(scope=args.scope, restored=windows)
    elif args.command == "flows" and args.scope:
        request["scope"] = args.scope
    elif args.command == "release":
        request["force"] = args.force
        if args.scope:
            request["scope"] = args.scope
    try:
        result = call(socket_path, request)
    except DaemonNotRunning as exc:
        if args.command == "release" and args.force and args.config is not None:
            return _release_without_daemon(args.config)
        print(f"shieldproxy {args.command}: {exc}", file=sys.stderr)
        return 1
    except ControlError as exc:
        print(f"shieldproxy {args.command}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def _parse_windows(items: list[str]) -> dict[str, dict[str, int]]:
    """Parse FLOW=RCV_NXT:RIGHT_EDGE options into the announce request's map."""
    windows = {}
    for item in items:
        flow, _, numbers = item.rpartition("=")
        rcv_nxt, _, right_edge = numbers.partition(":")
        try:
            values = {"rcv_nxt": int(rcv_nxt), "right_edge": int(right_edge)}
        except ValueError:
            raise ValueError(
                f"invalid --window {item!r}: use FLOW=RCV_NXT:RIGHT_EDGE with "
                "sequence numbers in decimal"
            ) from None
        if not flow or not all(0 <= v < 2**32 for v in values.values()):
            raise ValueError(
                f"invalid --window {item!r}: the flow is missing or a sequence "
                "number is outside 0..4294967295"
            )
        windows[flow] = values
    return windows


def _release_without_daemon(config_path: Path) -> int:
    """Remove the rules a stopped daemon left, found by their chain names."""
    from .config import ShieldConfig, load_config
    from .daemon import CHAIN_TAG_PREFIX
    from .kernel.rules import CHAIN_PREFIX, RulesError, remove_leftover_chains

    config = load_config(config_path, ShieldConfig)
    try:
        removed = remove_leftover_chains(
            config.netns, tag_prefix=CHAIN_PREFIX + CHAIN_TAG_PREFIX
        )
    except RulesError as exc:
        print(f"shieldproxy release: {exc}", file=sys.stderr)
        return 1
    for chain in removed:
        print(f"removed {chain} (no daemon was running)")
    if not removed:
        print("no daemon is running and none of its rules are left")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .config import ConfigError, DemoConfig, load_config
    from .demo import demo_main

    try:
        settings = load_config(args.config, DemoConfig) if args.config else DemoConfig()
        overrides: dict[str, object] = {}
        if args.freeze is not None:
            overrides["freeze_s"] = args.freeze
        if args.ipv6:
            overrides["ip_version"] = 6
        if args.rate is not None:
            overrides["rate_bytes_per_s"] = args.rate
        if args.no_baseline:
            overrides["baseline"] = False
        # validate the merged settings, so options get the file's checks too
        settings = DemoConfig.model_validate({**settings.model_dump(), **overrides})
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(format_errors(Path("(command line)"), exc), file=sys.stderr)
        return 2
    return demo_main(settings, json_path=args.json, keep_dir=args.keep)


def _bench(args: argparse.Namespace) -> int:
    """Run the benchmark runner of the checkout this package was installed from.

    The runner lives in ``bench/`` next to the package and is not installed,
    so it is found from this file's location, as an editable install has it.
    """
    import importlib

    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "bench" / "runner.py").is_file():
        print(
            f"shieldproxy bench: {checkout / 'bench'} not found; the benchmarks run "
            "from a source checkout installed with 'pip install -e'",
            file=sys.stderr,
        )
        return 2
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    runner = importlib.import_module("bench.runner")
    status: int = runner.run(args.preset, args.out, args.scenario)
    return status


def _lab(args: argparse.Namespace) -> int:
    from .lab.topology import lab_down, lab_down_all, lab_up

    if args.lab_command == "up":
        lab = lab_up(
            attacker=args.attacker,
            second_container=args.second_container,
            extra_peer_addresses=args.extra_peer_addresses,
            # the lab outlives this command, until 'lab down'
            persistent=True,
        )
        print(json.dumps(lab.__dict__, indent=2, default=str))
        print(f"remove it with: shieldproxy lab down {lab.lab_id}", file=sys.stderr)
        return 0
    removed = lab_down_all() if args.all else lab_down(args.lab_id)
    for item in removed:
        print(f"removed {item}")
    if not removed:
        print("nothing to remove")
    return 0


if __name__ == "__main__":
    sys.exit(main())
