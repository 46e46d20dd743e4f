"""The long-running shield: ``shieldproxy run --config FILE``.

One daemon serves every scope of its configuration. A scope is idle until a
``freeze`` request installs its NFQUEUE rules and hands the daemon snapshots
of the scope's flows (socket dump files). ``thaw`` writes one hand-over file
per flow for the restore, and ``release`` lets held packets through and
removes the scope's rules.

On SIGTERM or SIGINT with nothing frozen every rule goes. With a scope frozen,
its rules switch to plain DROP before the daemon exits, so peers see silence
and never a reset, and its flows stay in the state directory. The next start
adopts those rules, reads the flows back and answers again.

With ``durability: journal`` (the default) each frozen scope has a journal in
the state directory that records every acknowledged byte before its ACK is sent,
so a crash or ``kill -9`` loses nothing either: the rules stay in place and
drop the peers' packets while no process reads the queue, and the next start
replays the journal. With ``durability: memory`` only SIGTERM and SIGINT save
the flows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import hashlib
import importlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from .config import ConfigError, ScopeConfig, ShieldConfig, load_config
from .control import ControlError
from .control_server import serve_control
from .handover import peer_close_segment, save_handover
from .journal import (
    JOURNAL_FILE,
    JournalError,
    ScopeJournals,
    journal_path,
    read_journal,
)
from .kernel.netns import enter_netns
from .kernel.nfqueue import QueueBinding, QueuedPacket
from .kernel.rawsock import RawSender
from .kernel.repair import TCP_ESTABLISHED, SnapshotFileError, load_dump
from .kernel.rules import RulesError, RuleSet, remove_leftover_chains
from .metrics import ShieldMetrics
from .shield import Shield
from .state import (
    StateFileError,
    continuation,
    load_scope,
    remove_saved_flows,
    remove_scope,
    save_flow,
    save_scope,
    scope_folder,
    snapshot_from_document,
)
from .tcp.flow import FlowHandover, FlowState
from .tcp.segment import build_packet
from .tcp.seq import seq_add, seq_lt
from .tcp.snapshot import FlowKey, FlowSnapshot

log = logging.getLogger(__name__)

# Chains of the daemon are named SP-d-<scope tag>, so a restart can find and
# remove the ones a crashed daemon left behind without touching other users.
CHAIN_TAG_PREFIX = "d-"
WATCH_INTERVAL_S = 0.002
"""How often a freeze's image watch looks for new tcp-stream images."""
WATCH_TIMEOUT_S = 600.0
"""How long an image watch runs at most; the post-dump stage ends it sooner."""


class ScopeState(enum.Enum):
    IDLE = "idle"
    FROZEN = "frozen"
    HANDED_OVER = "handed-over"


@dataclass
class ScopeRuntime:
    """A configured scope and what the daemon currently does with it."""

    config: ScopeConfig
    rules: RuleSet
    state: ScopeState = ScopeState.IDLE
    frozen_at: float | None = None
    flows: set[FlowKey] = field(default_factory=set)
    snapshots: dict[FlowKey, FlowSnapshot] = field(default_factory=dict)
    """Original snapshot of each flow, kept to save it on shutdown."""
    carried: dict[FlowKey, tuple[int, bytes]] = field(default_factory=dict)
    """Start sequence number and bytes a previous process acknowledged."""
    handed_over_bytes: dict[FlowKey, int] = field(default_factory=dict)
    watch_generation: int = 0
    """Bumped to stop the running image watch, see Daemon.freeze."""
    restoring_into: Path | None = None
    """Folder of a thaw after which the shield still acknowledges the peers.

    It is set while a restore is under way."""
    in_images: dict[FlowKey, int] = field(default_factory=dict)
    """Bytes of each flow that such a thaw wrote into the images."""
    final: dict[FlowKey, FlowHandover] = field(default_factory=dict)
    """Each flow's final hand-over, kept for a restore that is tried again."""


@dataclass
class SavedScope:
    """A scope an earlier process left frozen or handed over, as read back."""

    frozen_for_s: float
    flows: list[tuple[FlowSnapshot, FlowHandover, float]]
    """(original snapshot, hand-over so far, monotonic time of its TSval)."""
    handed_over: bool
    source: str
    """Source it was read from, for the log: a journal or saved files."""


def chain_tag(scope_name: str) -> str:
    """Return the chain tag of a scope; long names are shortened with a hash."""
    if len(scope_name) <= 20:
        return CHAIN_TAG_PREFIX + scope_name
    digest = hashlib.sha256(scope_name.encode()).hexdigest()[:8]
    return f"{CHAIN_TAG_PREFIX}{scope_name[:11]}-{digest}"


class Daemon:
    """Scopes, the shield engine, and the handlers of control requests."""

    def __init__(self, config: ShieldConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.scopes = {
            scope.name: self._new_runtime(config, scope) for scope in config.scopes
        }
        self.shield: Shield | None = None
        self.journals = ScopeJournals() if config.durability == "journal" else None
        self.metrics = ShieldMetrics()
        self.bindings: list[QueueBinding] = []
        self._sender: RawSender | None = None
        self._nursery: trio.Nursery | None = None

    @staticmethod
    def _new_runtime(config: ShieldConfig, scope: ScopeConfig) -> ScopeRuntime:
        rules = RuleSet(
            chain_tag(scope.name),
            config.rule_scopes(scope.name),
            (config.queues.first, config.queues.last),
            hook=config.hook,
            netns=config.netns,
        )
        return ScopeRuntime(scope, rules)

    # lifecycle

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until SIGTERM or SIGINT, then clean up and return."""
        saved = self._saved_scopes()
        keep = [self.scopes[name].rules.chain for name in saved]
        removed = remove_leftover_chains(
            self.config.netns, tag_prefix="SP-" + CHAIN_TAG_PREFIX, keep=keep
        )
        if removed:
            log.warning("removed rules left by an earlier run: %s", ", ".join(removed))
        self._open_kernel_edges()
        for name, saved_scope in saved.items():
            self._resume_scope(name, saved_scope)
        endpoint = self.config.metrics.endpoint()
        if endpoint is not None:
            # bound from the daemon's own namespace: Prometheus scrapes the host
            self.metrics.start_http(endpoint)
            log.info("serving metrics on %s", self.config.metrics.address)
        try:
            with trio.open_signal_receiver(
                signal.SIGTERM, signal.SIGINT, signal.SIGHUP
            ) as signals:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    for binding in self.bindings:
                        nursery.start_soon(binding.serve, self._after_batch)
                    assert self.shield is not None
                    nursery.start_soon(self.shield.run_timers)
                    nursery.start_soon(self._expire_freezes)
                    nursery.start_soon(self._sample_metrics_forever)
                    control = self.config.control
                    await nursery.start(
                        serve_control, control.socket_path, control.socket_mode,
                        self.handle,
                    )  # fmt: skip
                    log.info(
                        "shieldproxy daemon started: mode %s, %d scopes, control "
                        "socket %s",
                        self.config.mode,
                        len(self.scopes),
                        control.socket_path,
                    )
                    task_status.started()
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            self.reload()
                            continue
                        log.info(
                            "received %s, shutting down", signal.Signals(signum).name
                        )
                        nursery.cancel_scope.cancel()
                        break
        finally:
            self.shutdown()

    def _open_kernel_edges(self) -> None:
        netns = self.config.netns
        self._sender = None
        try:
            with enter_netns(netns) if netns else contextlib.nullcontext():
                self._sender = RawSender()
                self.shield = Shield(
                    self._sender,
                    limits=self.config.flow_limits(),
                    trickle=self.config.trickle_policy(),
                    total_buffer_bytes=self.config.limits.total_buffer_bytes,
                    max_flows=self.config.limits.max_flows,
                    journal=self.journals,
                )
                for queue in range(
                    self.config.queues.first, self.config.queues.last + 1
                ):
                    self.bindings.append(QueueBinding(queue, self._handle_packet))
        except BaseException:
            self._close_kernel_edges()
            raise

    def _sample_metrics(self) -> None:
        assert self.shield is not None
        flows = self.shield.flows
        scopes = {
            name: (runtime.state.value, [flows[k] for k in runtime.flows if k in flows])
            for name, runtime in self.scopes.items()
        }
        self.metrics.sample(scopes, self.shield.counters.dropped)

    async def _sample_metrics_forever(self) -> None:
        while True:
            self._sample_metrics()
            await trio.sleep(1.0)

    def _handle_packet(self, packet: QueuedPacket) -> None:
        assert self.shield is not None
        self.shield.handle_packet(packet, time.monotonic())

    def _after_batch(self) -> None:
        # one journal commit for every packet of the read, then their ACKs
        assert self.shield is not None
        self.shield.flush(time.monotonic())

    def _close_kernel_edges(self) -> None:
        for binding in self.bindings:
            binding.close()
        self.bindings.clear()
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def reload(self) -> None:
        """Re-read the config file, keeping frozen scopes and their flows.

        Scopes that are idle are added, changed or removed as the file says. A
        frozen or handed-over scope keeps its old definition until it is
        released. Settings that need new kernel bindings (mode, netns, queues,
        control socket) take effect only on restart.
        """
        if self.config_path is None:
            log.warning("SIGHUP ignored: the daemon was not started from a file")
            return
        try:
            new = load_config(self.config_path, ShieldConfig)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return
        old = self.config
        for setting in ("mode", "netns", "queues", "control", "durability"):
            if getattr(new, setting) != getattr(old, setting):
                log.warning("reload: %s changed; it takes effect on restart", setting)
        busy = {n for n, r in self.scopes.items() if r.state is not ScopeState.IDLE}
        new_names = {scope.name for scope in new.scopes}
        for name in list(self.scopes):
            if name in busy:
                if name not in new_names or new.scope(name) != self.scopes[name].config:
                    log.warning(
                        "reload: scope %s is %s; its old definition stays until it "
                        "is released", name, self.scopes[name].state.value,
                    )  # fmt: skip
                continue
            if name not in new_names:
                del self.scopes[name]
                log.info("reload: removed scope %s", name)
        kept = new.model_copy(update={
            "mode": old.mode, "netns": old.netns, "queues": old.queues,
            "control": old.control, "durability": old.durability,
        })  # fmt: skip
        for scope in new.scopes:
            if scope.name in busy:
                continue
            current = self.scopes.get(scope.name)
            if current is None or current.config != scope:
                self.scopes[scope.name] = self._new_runtime(kept, scope)
                log.info("reload: %s scope %s", "added" if current is None else
                         "changed", scope.name)  # fmt: skip
        self.config = kept
        if self.shield is not None:
            self.shield.configure(
                kept.flow_limits(),
                kept.trickle_policy(),
                total_buffer_bytes=kept.limits.total_buffer_bytes,
                max_flows=kept.limits.max_flows,
            )
        log.info("reloaded %s: %d scopes", self.config_path, len(self.scopes))

    def _saved_scopes(self) -> dict[str, SavedScope]:
        """Read the scopes an earlier process left, from journals or saved files.

        A journal wins over saved files: both exist only when a crash hit a
        restart that moved saved files into a new journal.
        """
        saved = {}
        for name in self.scopes:
            folder = scope_folder(self.config.state_dir, name)
            loaded = self._read_journal(name, folder)
            if loaded is None:
                try:
                    from_files = load_scope(folder)
                except StateFileError as exc:
                    log.error("ignoring saved scope %s: %s", name, exc)
                    continue
                if from_files is not None:
                    frozen_for_s, flows = from_files
                    loaded = SavedScope(frozen_for_s, flows, False, "saved files")
            if loaded is not None:
                saved[name] = loaded
        return saved

    def _read_journal(self, name: str, folder: Path) -> SavedScope | None:
        path = journal_path(folder)
        if not path.exists():
            return None
        try:
            contents = read_journal(path)
        except JournalError as exc:
            damaged = path.with_name(f"{JOURNAL_FILE}.damaged-{int(time.time())}")
            log.error(
                "ignoring the journal of scope %s, kept as %s: %s", name, damaged, exc
            )
            try:
                path.replace(damaged)
            except OSError as rename_error:
                log.error("renaming %s failed: %s", path, rename_error)
            return None
        torn = contents.file_bytes - contents.valid_bytes
        if torn:
            log.info(
                "journal of scope %s ends in %d bytes of an unfinished write; "
                "their ACKs were never sent",
                name,
                torn,
            )
        for flow in contents.flows.values():
            if flow.missing_bytes:
                log.error(
                    "journal of scope %s: %s lacks %d acknowledged bytes",
                    name,
                    flow.snapshot.key,
                    flow.missing_bytes,
                )
        frozen_for_s = max(0.0, time.monotonic() - contents.frozen_at)
        return SavedScope(
            frozen_for_s, contents.recovered(), contents.thawed, "its journal"
        )

    def _resume_scope(self, name: str, saved: SavedScope) -> None:
        """Take over a scope an earlier process left frozen or handed over.

        A frozen scope is answered again from where the earlier process
        stopped. A handed-over scope holds its peers' packets until release.
        """
        runtime = self.scopes[name]
        runtime.rules.adopt("drop")
        runtime.rules.switch("queue")
        runtime.frozen_at = time.monotonic() - saved.frozen_for_s
        folder = scope_folder(self.config.state_dir, name)
        if self.journals is not None:
            # the new journal contains everything before the old files go
            self.journals.open(
                name, folder, runtime.frozen_at, saved.flows, thawed=saved.handed_over
            )
            remove_saved_flows(folder, keep_prefix=JOURNAL_FILE)
        else:
            journal_path(folder).unlink(missing_ok=True)
        assert self.shield is not None
        now = time.monotonic()
        for snapshot, handover, taken_at in saved.flows:
            key = snapshot.key
            self.shield.add_flow(continuation(snapshot, handover, taken_at), taken_at)
            runtime.flows.add(key)
            runtime.snapshots[key] = snapshot
            runtime.carried[key] = (handover.start_seq, handover.data)
            if saved.handed_over:
                self.shield.handover(key, now)
                runtime.handed_over_bytes[key] = len(handover.data)
        if saved.handed_over:
            runtime.state = ScopeState.HANDED_OVER
        else:
            runtime.state = ScopeState.FROZEN
        log.info(
            "resumed %s scope %s with %d flows saved by an earlier run, from %s: "
            "%d bytes acknowledged",
            runtime.state.value,
            name,
            len(saved.flows),
            saved.source,
            sum(len(handover.data) for _, handover, _ in saved.flows),
        )

    def _handover(
        self, runtime: ScopeRuntime, key: FlowKey, now: float
    ) -> FlowHandover:
        """Hand a flow over, including what an earlier process acknowledged."""
        assert self.shield is not None
        return _with_carried(runtime, key, self.shield.handover(key, now))

    def _save_frozen(self, runtime: ScopeRuntime) -> None:
        folder = scope_folder(self.config.state_dir, runtime.config.name)
        remove_scope(folder)
        now = time.monotonic()
        for key in sorted(runtime.flows):
            snapshot = runtime.snapshots.get(key)
            if snapshot is None:
                continue
            save_flow(folder, snapshot, self._handover(runtime, key, now), now)
        frozen_for = 0.0 if runtime.frozen_at is None else now - runtime.frozen_at
        save_scope(folder, frozen_for)
        log.warning(
            "saved frozen scope %s with %d flows to %s", runtime.config.name,
            len(runtime.flows), folder,
        )  # fmt: skip

    def _close_journal(self, runtime: ScopeRuntime) -> None:
        """Acknowledge what a frozen scope holds, then close its journal."""
        assert self.shield is not None and self.journals is not None
        if runtime.state is ScopeState.FROZEN:
            now = time.monotonic()
            for key in sorted(runtime.flows):
                flow = self.shield.flows.get(key)
                if flow is not None and flow.state is FlowState.SHIELDING:
                    self.shield.handover(key, now)
        self.journals.close(runtime.config.name)
        log.warning(
            "left %s scope %s with %d flows in its journal",
            runtime.state.value,
            runtime.config.name,
            len(runtime.flows),
        )

    def shutdown(self) -> None:
        """Remove idle scopes' rules; save frozen scopes and leave plain DROP."""
        for runtime in self.scopes.values():
            try:
                if runtime.state is ScopeState.IDLE:
                    runtime.rules.remove()
                else:
                    # drop first: from here on nothing answers, and nothing
                    # reaches a container that has no socket
                    runtime.rules.switch("drop")
                    if self.journals is not None:
                        self._close_journal(runtime)
                    elif runtime.state is ScopeState.FROZEN:
                        self._save_frozen(runtime)
                    log.warning(
                        "scope %s is %s with %d flows: its peers' packets are "
                        "dropped until 'shieldproxy release --force'",
                        runtime.config.name,
                        runtime.state.value,
                        len(runtime.flows),
                    )
            except (RulesError, OSError) as exc:
                log.error("cleaning up scope %s failed: %s", runtime.config.name, exc)
        self._close_kernel_edges()
        self.metrics.close()
        log.info("shieldproxy daemon stopped")

    async def _expire_freezes(self) -> None:
        limit = self.config.freeze.max_freeze_s
        while True:
            await trio.sleep(1.0)
            now = time.monotonic()
            for runtime in self.scopes.values():
                if runtime.frozen_at is None or now - runtime.frozen_at < limit:
                    continue
                name = runtime.config.name
                if self.config.freeze.on_expiry == "release":
                    log.error("scope %s frozen past %.0f s: releasing it", name, limit)
                    self.release(name, force=True)
                elif runtime.rules.action != "drop":
                    log.error(
                        "scope %s frozen past %.0f s: dropping its peers' packets",
                        name,
                        limit,
                    )
                    self._stop_answering(runtime)
                    runtime.rules.switch("drop")

    # control requests

    async def handle(self, request: dict[str, Any]) -> Any:
        command = request["command"]
        try:
            if command == "status":
                return self.status()
            if command == "flows":
                return self.flows(request.get("scope"))
            if command == "freeze":
                return self.freeze(
                    _text(request, "scope"),
                    request.get("dumps", []),
                    request.get("snapshots", []),
                    request.get("watch"),
                )
            if command == "thaw":
                return self.thaw(
                    _text(request, "scope"),
                    Path(_text(request, "out_dir")),
                    keep_answering=bool(request.get("keep_answering", False)),
                    requester_pid=request.get("requester_pid"),
                )
            if command == "announce":
                return self.announce(
                    _text(request, "scope"),
                    request.get("restored", {}),
                    restored_pid=request.get("restored_pid"),
                )
            if command == "release":
                return self.release(
                    request.get("scope"),
                    force=bool(request.get("force", False)),
                    restored=request.get("restored", {}),
                )
        except (
            RulesError,
            SnapshotFileError,
            StateFileError,
            OSError,
            ValueError,
            KeyError,
        ) as exc:
            log.error("%s request failed: %s", command, exc)
            raise ControlError(f"{command} failed: {exc}") from None
        raise ControlError(f"invalid request: unknown command {command!r}")

    def _runtime(self, name: str) -> ScopeRuntime:
        try:
            return self.scopes[name]
        except KeyError:
            known = ", ".join(sorted(self.scopes))
            raise ControlError(
                f"scope {name!r} not found; configured: {known}"
            ) from None

    def freeze(
        self,
        name: str,
        dumps: list[str],
        documents: list[Any] | None = None,
        watch: Any = None,
    ) -> dict[str, Any]:
        """Divert the scope's peers to the shield and start answering for flows.

        The flows come from socket dump files (DUMPS) or from snapshot
        documents, as a CRIU action script reads them from the images. Packets
        of flows not yet known are held until their snapshot arrives. Flows
        whose container end is outside the scope are ignored and listed.

        WATCH, ``{"image_dir": PATH, "flows": {INODE: KEY}}``, starts a task
        that adds each flow as soon as CRIU has written its tcp-stream image,
        so the shield answers long before the dump ends. Snapshot documents
        without a watch end a running watch.
        """
        runtime = self._runtime(name)
        if runtime.state is ScopeState.HANDED_OVER:
            raise ControlError(f"scope {name!r} is handed over; release it first")
        if not isinstance(dumps, list) or not all(isinstance(d, str) for d in dumps):
            raise ControlError("invalid request: 'dumps' must be a list of paths")
        if not isinstance(documents, list):
            raise ControlError("invalid request: 'snapshots' must be a list")
        snapshots = [load_dump(Path(path)).flow_snapshot() for path in dumps]
        snapshots += [snapshot_from_document(document) for document in documents]
        ignored = [
            str(s.key)
            for s in snapshots
            if not runtime.config.covers(s.key.container_addr, s.key.container_port)
        ]
        snapshots = [s for s in snapshots if str(s.key) not in ignored]
        if ignored:
            log.info("freeze of scope %s ignores flows outside it: %s", name, ignored)
        if runtime.state is ScopeState.IDLE:
            frozen_at = time.monotonic()
            if self.journals is not None:
                folder = scope_folder(self.config.state_dir, name)
                self.journals.open(name, folder, frozen_at)
            try:
                runtime.rules.install("queue")
            except BaseException:
                if self.journals is not None:
                    self.journals.close(name, remove=True)
                raise
            runtime.state = ScopeState.FROZEN
            runtime.frozen_at = frozen_at
            log.info("froze scope %s", name)
        rejected = self._add_snapshots(runtime, snapshots)
        writer = None if self.journals is None else self.journals.writer(name)
        if writer is not None and writer.failed:
            raise ControlError(
                f"freeze of scope {name!r} failed: its journal {writer.path} cannot "
                "be written, so the shield withholds its ACKs; free the state "
                "directory's disk and freeze again, or release the scope"
            )
        if watch is not None:
            self._start_watch(runtime, watch)
        elif documents:
            runtime.watch_generation += 1
        if rejected:
            raise ControlError(
                f"freeze of scope {name!r} shielded {len(runtime.flows)} flows but "
                f"not {len(rejected)} more, such as {rejected[0]}: the shield "
                f"already has limits.max_flows ({self.config.limits.max_flows}) "
                "flows. Raise limits.max_flows or release another scope, then "
                "freeze again"
            )
        return {
            "scope": name,
            "state": runtime.state.value,
            "flows": len(runtime.flows),
            "ignored": ignored,
        }

    def _add_snapshots(
        self, runtime: ScopeRuntime, snapshots: list[FlowSnapshot]
    ) -> list[FlowKey]:
        """Shield the new flows up to limits.max_flows; return the rejected ones."""
        assert self.shield is not None
        new = [s for s in snapshots if s.key not in runtime.flows]
        rejected: list[FlowKey] = []
        max_flows = self.shield.max_flows
        if max_flows is not None:
            room = max(0, max_flows - len(self.shield.flows))
            rejected = [snapshot.key for snapshot in new[room:]]
            new = new[:room]
        if rejected:
            log.error(
                "scope %s: %d flows not shielded, such as %s: the shield already "
                "has limits.max_flows (%d) flows",
                runtime.config.name,
                len(rejected),
                rejected[0],
                max_flows,
            )
        if self.journals is not None and new:
            # each flow's snapshot is on disk before anything is acknowledged
            name = runtime.config.name
            for snapshot in new:
                self.journals.add_flow(name, snapshot)
            self.journals.commit()
        for snapshot in new:
            self.shield.add_flow(snapshot, time.monotonic())
            runtime.flows.add(snapshot.key)
            runtime.snapshots[snapshot.key] = snapshot
        self._sample_metrics()
        return rejected

    def _start_watch(self, runtime: ScopeRuntime, watch: Any) -> None:
        try:
            image_dir = Path(watch["image_dir"])
            pending = {
                int(inode): (
                    FlowKey.create(
                        str(key["container_addr"]),
                        int(key["container_port"]),
                        str(key["peer_addr"]),
                        int(key["peer_port"]),
                    ),
                    int(key.get("state", TCP_ESTABLISHED)),
                )
                for inode, key in watch["flows"].items()
            }
            pending = {
                inode: (key, state)
                for inode, (key, state) in pending.items()
                if runtime.config.covers(key.container_addr, key.container_port)
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ControlError(
                'invalid request: \'watch\' must be {"image_dir": PATH, "flows": '
                f"{{INODE: KEY}}}}, each KEY with an optional TCP state ({exc})"
            ) from None
        if self._nursery is None:
            raise ControlError("the daemon is not serving yet")
        runtime.watch_generation += 1
        self._nursery.start_soon(
            self._watch_images, runtime, image_dir, pending, runtime.watch_generation
        )

    async def _watch_images(
        self,
        runtime: ScopeRuntime,
        image_dir: Path,
        pending: dict[int, tuple[FlowKey, int]],
        generation: int,
    ) -> None:
        """Add each pending flow once CRIU has written its tcp-stream image."""
        # pycriu takes about 0.1 s to import, which the first flow must not wait
        # for: the peers' packets are held from now on.
        images = await trio.to_thread.run_sync(
            importlib.import_module, "shieldproxy.criu.images"
        )
        ImageError = images.ImageError
        read_stream_snapshot = images.read_stream_snapshot
        stream_image_name = images.stream_image_name
        name = runtime.config.name
        log.info("scope %s: watching %s for %d flows", name, image_dir, len(pending))
        deadline = time.monotonic() + WATCH_TIMEOUT_S
        while pending and time.monotonic() < deadline:
            if (
                runtime.state is not ScopeState.FROZEN
                or runtime.watch_generation != generation
            ):
                break
            for inode, (key, state) in list(pending.items()):
                path = image_dir / stream_image_name(inode)
                if key in runtime.flows:
                    del pending[inode]
                    continue
                if not path.exists():
                    continue
                try:
                    snapshot = await trio.to_thread.run_sync(
                        partial(read_stream_snapshot, path, key, state=state)
                    )
                except ImageError:
                    continue  # CRIU is still writing it
                del pending[inode]
                if runtime.watch_generation == generation:
                    # a rejected flow is logged there, and its packets stay held
                    # until they expire
                    if not self._add_snapshots(runtime, [snapshot]):
                        log.info("scope %s: %s learned from %s", name, key, path.name)
            await trio.sleep(WATCH_INTERVAL_S)
        if pending:
            log.info(
                "scope %s: image watch ended with %d flows not seen: %s",
                name,
                len(pending),
                ", ".join(str(key) for key, _ in pending.values()),
            )

    def thaw(
        self,
        name: str,
        out_dir: Path,
        *,
        keep_answering: bool = False,
        requester_pid: Any = None,
    ) -> dict[str, Any]:
        """Hand every flow of the scope over and write one file pair per flow.

        With KEEP_ANSWERING the files hold what the flows acknowledged so far,
        and the shield goes on answering until ``announce`` gives the rest
        straight to the restored sockets. That needs the restored processes in
        this daemon's PID namespace, which REQUESTER_PID (the caller, running
        beside CRIU) shows; without it this is a plain thaw. Thawing a scope
        whose final hand-over is done writes that hand-over again, for a
        restore that is tried again.
        """
        runtime = self._runtime(name)
        if runtime.state is ScopeState.HANDED_OVER and runtime.final:
            files = [
                str(save_handover(handover, out_dir, time.monotonic()))
                for _, handover in sorted(runtime.final.items())
            ]
            return {"scope": name, "handovers": files, "keep_answering": False}
        if runtime.state is not ScopeState.FROZEN:
            raise ControlError(f"scope {name!r} is {runtime.state.value}, not frozen")
        assert self.shield is not None
        if keep_answering and _same_pid_namespace(requester_pid):
            return self._thaw_answering(runtime, out_dir)
        files = []
        for key in sorted(runtime.flows):
            now = time.monotonic()
            handover = self._handover(runtime, key, now)
            runtime.final[key] = handover
            runtime.handed_over_bytes[key] = len(handover.data)
            files.append(str(save_handover(handover, out_dir, now)))
        if self.journals is not None:
            # from here the hand-over files hold the bytes
            self.journals.mark_thawed(name)
            self.journals.commit()
        runtime.state = ScopeState.HANDED_OVER
        self._sample_metrics()
        log.info("handed over scope %s: %d flows to %s", name, len(files), out_dir)
        return {"scope": name, "handovers": files}

    def _thaw_answering(self, runtime: ScopeRuntime, out_dir: Path) -> dict[str, Any]:
        assert self.shield is not None
        files = []
        for key in sorted(runtime.flows):
            now = time.monotonic()
            handover = _with_carried(
                runtime, key, self.shield.handover_so_far(key, now)
            )
            runtime.in_images[key] = len(handover.data)
            files.append(str(save_handover(handover, out_dir, now)))
        runtime.restoring_into = out_dir
        log.info(
            "handed over scope %s so far: %d flows to %s, still acknowledging",
            runtime.config.name,
            len(files),
            out_dir,
        )
        return {
            "scope": runtime.config.name,
            "handovers": files,
            "keep_answering": True,
        }

    def _finish_restoring(
        self,
        runtime: ScopeRuntime,
        restored: dict[str, dict[str, int]],
        restored_pid: Any,
    ) -> dict[str, dict[str, int]]:
        """Stop answering and give each restored socket the bytes that came since.

        Returns the restored windows after the top-up, by flow.

        Raises:
            ControlError: a restored socket is missing or refused its bytes;
                the final hand-over is kept, so a second restore gets it all.
        """
        assert self.shield is not None and runtime.restoring_into is not None
        name = runtime.config.name
        folder = runtime.restoring_into
        for key in sorted(runtime.flows):
            now = time.monotonic()
            handover = self._handover(runtime, key, now)
            runtime.final[key] = handover
            runtime.handed_over_bytes[key] = len(handover.data)
            save_handover(handover, folder, now)
        if self.journals is not None:
            # from here the hand-over files hold the bytes
            self.journals.mark_thawed(name)
            self.journals.commit()
        runtime.state = ScopeState.HANDED_OVER
        runtime.restoring_into = None
        self._sample_metrics()
        if isinstance(restored_pid, bool) or not isinstance(restored_pid, int):
            raise ControlError(
                "invalid request: 'restored_pid' must be the restored tree's PID "
                "after a thaw that kept answering"
            )
        try:
            return self._top_up(runtime, restored, restored_pid)
        except OSError as exc:
            log.error("scope %s: topping up the restored sockets failed: %s", name, exc)
            raise ControlError(
                f"giving the restored sockets their last bytes failed: {exc}; "
                "restore again, the hand-over files now hold every byte"
            ) from None

    def _top_up(
        self,
        runtime: ScopeRuntime,
        restored: dict[str, dict[str, int]],
        restored_pid: int,
    ) -> dict[str, dict[str, int]]:
        from .kernel.topup import TopUpError, restored_sockets, top_up
        from .tcp.flow import restore_tsval

        keys = set(runtime.final)
        sockets = restored_sockets(restored_pid, keys)
        try:
            missing = sorted(str(key) for key in keys - set(sockets))
            if missing:
                raise TopUpError(
                    errno.ENOENT,
                    f"restored process {restored_pid} has no socket for {missing}",
                )
            windows: dict[str, dict[str, int]] = {}
            for key, handover in sorted(runtime.final.items()):
                written = runtime.in_images.get(key, 0)
                window = restored.get(str(key), {})
                # one scale unit of slack, as restored_right_edge explains
                snapshot = runtime.snapshots.get(key)
                unit = 1 << (snapshot.rcv_wscale if snapshot is not None else 14)
                floor = seq_add(handover.right_edge, unit)
                edge = int(window.get("right_edge", floor))
                if seq_lt(edge, floor):
                    edge = floor
                rcv_nxt, right_edge = top_up(
                    sockets[key],
                    key=key,
                    expected_rcv_nxt=seq_add(handover.start_seq, written),
                    data=handover.data[written:],
                    right_edge=edge,
                    tsval_floor=restore_tsval(
                        handover.tsval, time.monotonic(), time.monotonic()
                    ),
                )
                windows[str(key)] = {"rcv_nxt": rcv_nxt, "right_edge": right_edge}
        finally:
            for sock in sockets.values():
                sock.close()
        return windows

    def announce(
        self,
        name: str,
        restored: dict[str, dict[str, int]],
        *,
        restored_pid: Any = None,
    ) -> dict[str, Any]:
        """Send the restored sockets' windows while still holding the peers' packets.

        Call it once the sockets are restored but still in repair mode (CRIU's
        post-restore stage), then ``release`` once repair is off: Linux did not
        acknowledge data that reached a socket in repair mode until the peer
        retransmitted it. The container's own packets pass from here on. After
        a thaw that kept answering, this first stops answering and appends what
        came since to the sockets of RESTORED_PID's tree.
        """
        runtime = self._runtime(name)
        if not isinstance(restored, dict):
            raise ControlError("invalid request: 'restored' must map flows to windows")
        if runtime.state is ScopeState.FROZEN and runtime.restoring_into is not None:
            restored = {
                **restored,
                **self._finish_restoring(runtime, restored, restored_pid),
            }
        if runtime.state is not ScopeState.HANDED_OVER:
            raise ControlError(
                f"scope {name!r} is {runtime.state.value}, not handed over"
            )
        assert self.shield is not None
        announced = []
        for key in sorted(runtime.flows):
            window = restored.get(str(key))
            if key not in self.shield.flows or not isinstance(window, dict):
                continue
            self.shield.announce(
                key,
                time.monotonic(),
                restored_rcv_nxt=int(window["rcv_nxt"]),
                restored_right_edge=int(window["right_edge"]),
            )
            announced.append(str(key))
        runtime.rules.switch("queue-in")
        log.info(
            "announced restored windows of scope %s: %d flows", name, len(announced)
        )
        return {"scope": name, "announced": announced, "windows": restored}

    def release(
        self,
        name: str | None,
        *,
        force: bool = False,
        restored: dict[str, dict[str, int]] | None = None,
    ) -> dict[str, Any]:
        """Let held packets through and remove the rules of one or all scopes.

        ``restored`` maps a flow (``str(FlowKey)``) to the restored socket's
        ``rcv_nxt`` and ``right_edge``; the shield then announces that window.
        """
        names = [name] if name is not None else list(self.scopes)
        released = []
        for scope_name in names:
            runtime = self._runtime(scope_name)
            if runtime.state is ScopeState.FROZEN and not force:
                raise ControlError(
                    f"scope {scope_name!r} is frozen; thaw it first, or pass force "
                    "to drop what it absorbed"
                )
            self._stop_answering(runtime, restored or {})
            assert self.shield is not None
            self.shield.release_unknown(partial(_covers, runtime.config))
            runtime.rules.remove()
            if runtime.frozen_at is not None:
                frozen_for = time.monotonic() - runtime.frozen_at
                self.metrics.freeze_ended(scope_name, frozen_for)
            runtime.state = ScopeState.IDLE
            runtime.frozen_at = None
            runtime.handed_over_bytes.clear()
            runtime.flows.clear()
            runtime.snapshots.clear()
            runtime.carried.clear()
            runtime.restoring_into = None
            runtime.in_images.clear()
            runtime.final.clear()
            if self.journals is not None:
                self.journals.close(scope_name, remove=True)
            remove_scope(scope_folder(self.config.state_dir, scope_name))
            released.append(scope_name)
            log.info("released scope %s", scope_name)
        self._sample_metrics()
        return {"released": released}

    def _stop_answering(
        self, runtime: ScopeRuntime, restored: dict[str, dict[str, int]] | None = None
    ) -> None:
        assert self.shield is not None
        now = time.monotonic()
        for key in runtime.flows:
            if key not in self.shield.flows:
                continue
            window = (restored or {}).get(str(key), {})
            flow = self.shield.flows[key]
            tsecr = flow.tsval_at(now)
            self.shield.release(
                key,
                now,
                restored_rcv_nxt=window.get("rcv_nxt"),
                restored_right_edge=window.get("right_edge"),
            )
            self._send_peer_close(runtime, key, tsecr)
            handed_over = runtime.handed_over_bytes.get(key, 0)
            self.metrics.flow_released(runtime.config.name, flow.stats, handed_over)

    def _send_peer_close(self, runtime: ScopeRuntime, key: FlowKey, tsecr: int) -> None:
        """Give a restored socket the peer's FIN or RST that the shield took."""
        handover = runtime.final.get(key)
        snapshot = runtime.snapshots.get(key)
        if handover is None or snapshot is None or self._sender is None:
            return
        segment = peer_close_segment(handover, snapshot, tsecr=tsecr)
        if segment is None:
            return
        packet = build_packet(segment)
        if self._sender.send(packet, segment.version, segment.dst):
            log.info("sent %s the peer's %s", key, "RST" if handover.reset else "FIN")
        else:
            log.error("sending %s the peer's FIN or RST failed", key)

    def status(self) -> dict[str, Any]:
        """Return per scope: state, flows, bytes absorbed, ACKs sent, freeze age."""
        assert self.shield is not None
        now = time.monotonic()
        scopes = {}
        for name, runtime in self.scopes.items():
            flows = [
                self.shield.flows[k] for k in runtime.flows if k in self.shield.flows
            ]
            scopes[name] = {
                "addresses": list(runtime.config.addresses),
                "ports": list(runtime.config.ports),
                "state": runtime.state.value,
                "flows": len(runtime.flows),
                "bytes_absorbed": sum(f.stats.bytes_absorbed for f in flows),
                "acks_sent": sum(f.stats.acks_sent for f in flows),
                "bytes_recovered": sum(
                    len(data) for _, data in runtime.carried.values()
                ),
                "frozen_for_s": (
                    None
                    if runtime.frozen_at is None
                    else round(now - runtime.frozen_at, 3)
                ),
            }
        return {
            "mode": self.config.mode,
            "durability": self.config.durability,
            "scopes": scopes,
        }

    def flows(self, scope: str | None) -> list[dict[str, Any]]:
        """Return one entry per shielded flow, with its counters."""
        assert self.shield is not None
        names = [scope] if scope is not None else list(self.scopes)
        result = []
        for name in names:
            runtime = self._runtime(name)
            for key in sorted(runtime.flows):
                flow = self.shield.flows.get(key)
                entry: dict[str, Any] = {"scope": name, "flow": str(key)}
                if flow is not None:
                    entry.update(
                        state=flow.state.value,
                        rcv_nxt=flow.rcv_nxt,
                        right_edge=flow.right_edge,
                        buffered_bytes=flow.buffered_bytes,
                        **flow.stats.as_dict(),
                    )
                else:
                    entry["state"] = FlowState.HANDED_OVER.value
                result.append(entry)
        return result


def _text(request: dict[str, Any], name: str) -> str:
    value = request.get(name)
    if not isinstance(value, str) or not value:
        raise ControlError(f"invalid request: {name!r} must be a non-empty string")
    return value


def _same_pid_namespace(pid: Any) -> bool:
    """Return True when process PID shares this daemon's PID namespace."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        theirs = os.stat(f"/proc/{pid}/ns/pid").st_ino
        ours = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return False
    return theirs == ours


def _covers(scope: ScopeConfig, key: FlowKey) -> bool:
    return scope.covers(key.container_addr, key.container_port)


def _with_carried(
    runtime: ScopeRuntime, key: FlowKey, handover: FlowHandover
) -> FlowHandover:
    """Prepend the bytes an earlier daemon process acknowledged for KEY."""
    carried = runtime.carried.get(key)
    if carried is None:
        return handover
    start_seq, data = carried
    return dataclasses.replace(handover, start_seq=start_seq, data=data + handover.data)
