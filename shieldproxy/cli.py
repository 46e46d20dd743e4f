"""The ``shieldproxy`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from .config import format_errors


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "lab":
        return _lab(args)
    if args.command == "demo":
        return _demo(args)
    if args.command == "check-pcap":
        from .pcapcheck import main as check_main

        return check_main(args.args)
    raise AssertionError(args.command)


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


def _lab(args: argparse.Namespace) -> int:
    from .lab.topology import lab_down, lab_down_all, lab_up

    if args.lab_command == "up":
        lab = lab_up(
            attacker=args.attacker, extra_peer_addresses=args.extra_peer_addresses
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
