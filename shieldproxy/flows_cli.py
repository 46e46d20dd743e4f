"""Commands `shieldproxy flows list` and `shieldproxy flows export`.

They read the journals a daemon keeps in its state directory, so they work
while the daemon runs and after it crashed, without its control socket.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .journal import JournalContents


def _default_state_dir() -> Path:
    """Return the ``state_dir`` of a config file that sets none."""
    from .config import ShieldConfig

    default: Path = ShieldConfig.model_fields["state_dir"].default
    return default


def add_journal_commands(flows: argparse.ArgumentParser) -> None:
    """Add ``flows list`` and ``flows export``, which read a daemon's journals.

    ``shieldproxy flows`` without a subcommand still prints the flows the
    daemon shields now. The subcommands' ``--config`` and ``--scope`` may
    also come before the subcommand, where the parent parser takes them.
    """
    flows.description = (
        "Without a subcommand, print the flows the daemon shields now. 'list' "
        "and 'export' read the journals in its state directory instead, also "
        "when no daemon runs."
    )
    actions = flows.add_subparsers(dest="flows_command", metavar="{list,export}")
    listing = actions.add_parser(
        "list", help="print the flows of the journals in a state directory as JSON"
    )
    _add_journal_source(listing)
    export = actions.add_parser(
        "export", help="write the bytes the shield acknowledged for one flow"
    )
    _add_journal_source(export)
    export.add_argument(
        "--flow",
        required=True,
        help="flow as 'shieldproxy flows list' prints it: PEER:PORT->CONTAINER:PORT",
    )
    export.add_argument(
        "--out", required=True, help="file to write, or - for standard output"
    )
    export.add_argument(
        "--force", action="store_true", help="overwrite the --out file if it exists"
    )


def _add_journal_source(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    # SUPPRESS keeps a value the parent 'flows' parser took before the subcommand.
    where.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="the daemon's config file, whose state_dir contains the journals",
    )
    where.add_argument(
        "--state-dir",
        type=Path,
        help=f"the daemon's state directory (default {_default_state_dir()})",
    )
    where.add_argument(
        "--journal", type=Path, help="one journal file, STATE_DIR/SCOPE/journal"
    )
    parser.add_argument(
        "--scope", default=argparse.SUPPRESS, help="only this scope's journal"
    )


class _JournalLookupError(ValueError):
    """No journal was found, or the options that name it are invalid."""


def flows_from_journals(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .journal import JournalError, read_journal

    command = f"shieldproxy flows {args.flows_command}"
    try:
        paths = _find_journals(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except _JournalLookupError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 1
    journals: list[tuple[Path, JournalContents]] = []
    failed = False
    for path in paths:
        try:
            contents = read_journal(path)
        except JournalError as exc:
            print(f"{command}: {exc}", file=sys.stderr)
            failed = True
            continue
        if args.scope is not None and contents.scope != args.scope:
            print(
                f"{command}: journal {path} is of scope {contents.scope!r}, not "
                f"{args.scope!r}. Leave out --scope or pass that scope's journal",
                file=sys.stderr,
            )
            return 1
        journals.append((path, contents))
    if args.flows_command == "list":
        _print_journal_listings(journals)
        return 1 if failed else 0
    return _export_flow(args, command, journals)


def _find_journals(args: argparse.Namespace) -> list[Path]:
    """Return the journal files that --journal, --state-dir or --config name.

    Raises:
        ConfigError: the --config file is invalid.
        _JournalLookupError: no journal is there; the message names where the
            command looked and what to pass instead.
    """
    from .config import ShieldConfig, load_config
    from .journal import JOURNAL_FILE, journal_path
    from .state import scope_folder

    if args.socket is not None:
        raise _JournalLookupError(
            "--socket is not valid here, because 'flows list' and 'flows export' "
            "read journals, not the daemon. Pass --config FILE, --state-dir DIR "
            "or --journal FILE"
        )
    if args.config is not None and (args.state_dir or args.journal):
        raise _JournalLookupError(
            "--config is not valid with --state-dir or --journal. Pass only one of them"
        )
    if args.journal is not None:
        if not args.journal.is_file():
            raise _JournalLookupError(
                f"journal {args.journal} not found. A scope's journal is "
                "STATE_DIR/SCOPE/journal"
            )
        return [args.journal]
    hint = ""
    if args.config is not None:
        config = load_config(args.config, ShieldConfig)
        state_dir = config.state_dir
        origin = f"the state_dir of {args.config}"
        if config.durability == "memory":
            hint = (
                f". {args.config} sets durability: memory, so the daemon writes "
                "no journal"
            )
    elif args.state_dir is not None:
        state_dir, origin = args.state_dir, "--state-dir"
    else:
        state_dir, origin = _default_state_dir(), "the default"
    if not state_dir.is_dir():
        raise _JournalLookupError(
            f"state directory {state_dir} ({origin}) not found. Pass --config "
            "with the daemon's config file, or --state-dir DIR"
        )
    found = sorted(p for p in state_dir.glob(f"*/{JOURNAL_FILE}") if p.is_file())
    if args.scope is not None:
        path = journal_path(scope_folder(state_dir, args.scope))
        if path.is_file():
            return [path]
        scopes = ", ".join(p.parent.name for p in found) or "none"
        raise _JournalLookupError(
            f"scope {args.scope!r} has no journal at {path}. Scopes with a "
            f"journal in {state_dir}: {scopes}{hint}"
        )
    if not found:
        raise _JournalLookupError(
            f"no journal found: looked for {state_dir}/*/{JOURNAL_FILE} "
            f"({origin}). A scope has a journal only from its freeze until its "
            f"release{hint}"
        )
    return found


def _print_journal_listings(journals: list[tuple[Path, JournalContents]]) -> None:
    from .journal import journal_listing

    listings = [
        {"journal": str(path), **journal_listing(contents)}
        for path, contents in journals
    ]
    print(json.dumps(listings, indent=2))


def _export_flow(
    args: argparse.Namespace,
    command: str,
    journals: list[tuple[Path, JournalContents]],
) -> int:
    """Write the acknowledged bytes of the flow named by --flow to --out.

    Returns 1 when the journal lacks acknowledged bytes: the bytes before the
    gap are written all the same, and the message counts the rest.
    """
    from .journal import JournaledFlow

    matches: list[tuple[Path, str, JournaledFlow]] = [
        (path, contents.scope, flow)
        for path, contents in journals
        for flow in contents.flows.values()
        if str(flow.snapshot.key) == args.flow
    ]
    if not matches:
        known = [
            f"{flow.snapshot.key} (scope {contents.scope})"
            for _, contents in journals
            for flow in contents.flows.values()
        ]
        searched = ", ".join(str(path) for path, _ in journals) or "no readable journal"
        print(
            f"{command}: flow {args.flow!r} not found in {searched}. The journals "
            f"contain: {', '.join(known) or 'no flows'}. Pass --flow with one of "
            "them, as 'shieldproxy flows list' prints it",
            file=sys.stderr,
        )
        return 1
    if len(matches) > 1:
        scopes = ", ".join(scope for _, scope, _ in matches)
        print(
            f"{command}: flow {args.flow!r} is in the journals of scopes {scopes}. "
            "Pass --scope to choose one",
            file=sys.stderr,
        )
        return 1
    path, scope, flow = matches[0]
    handover, _ = flow.handover()
    try:
        _write_export(args.out, handover.data, force=args.force)
    except FileExistsError:
        print(
            f"{command}: {args.out} exists. Pass --force to overwrite it, or "
            "choose another --out",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"{command}: writing {args.out} failed: {exc}", file=sys.stderr)
        return 1
    report = sys.stderr if args.out == "-" else sys.stdout
    print(
        f"wrote {len(handover.data)} bytes of flow {args.flow} (scope {scope}, "
        f"from sequence number {handover.start_seq}) to {args.out}",
        file=report,
    )
    if handover.fin:
        print("the peer's FIN follows the last byte", file=report)
    if handover.discarded_bytes:
        print(
            f"{handover.discarded_bytes} more bytes are journaled but were not "
            "acknowledged, so the peer still has them and they are not written",
            file=report,
        )
    if flow.missing_bytes:
        print(
            f"{command}: journal {path} lacks {flow.missing_bytes} acknowledged "
            f"bytes of flow {args.flow} after its first {len(handover.data)} "
            f"bytes, so {args.out} contains only the bytes before that gap",
            file=sys.stderr,
        )
        return 1
    return 0


def _write_export(out: str, data: bytes, *, force: bool) -> None:
    """Write DATA to the file OUT, or to standard output for ``-``.

    Raises:
        FileExistsError: OUT exists and FORCE is not set.
        OSError: the file cannot be written.
    """
    if out == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    # "x" creates the file or fails, so a file that appears meanwhile is kept
    with open(out, "wb" if force else "xb") as file:
        file.write(data)
