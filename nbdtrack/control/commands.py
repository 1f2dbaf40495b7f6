"""The QMP commands nbdtrack answers: QEMU's bitmap and export commands, and its own.

Each command is a name, an argument schema (QEMU's argument names) and a handler
``handler(control, args) -> result``. Handlers may block (bitmap changes are written
and fsynced before they return), so the server runs them in worker threads; they touch
no socket. A node is an export: ``node`` names it, as ``node-name`` does in QEMU.

Bitmap changes, alone or in a ``transaction``, go through the exports' trackers as one
all-or-nothing group: every tracker involved is locked (in export-name order, so two
transactions never deadlock), the actions run in order, and the first failure undoes
them all. Only an I/O error while saving the state files of several exports can leave
the exports saved before it changed.

Differences from QEMU, where nbdtrack's meaning differs:
- ``block-dirty-bitmap-add``: ``persistent`` defaults to true (QEMU: false): nbdtrack
  keeps bitmaps of raw images in its state directory, so persistence costs nothing.
  ``persistent: false`` makes a bitmap that is gone after a restart.
- ``block-dirty-bitmap-merge``: sources named as ``{"node", "name"}`` must be on the
  target's node; nbdtrack merges bitmaps of one export only.
- ``query-named-block-nodes`` always has ``dirty-bitmaps`` (empty if there are none),
  and every bitmap in it has ``inconsistent`` (QEMU leaves out both when empty/false),
  and nbdtrack's own members too (``generation``: it changes whenever bits are dropped).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nbdtrack import __version__
from nbdtrack.control.errors import GenericError, QMPError
from nbdtrack.control.schema import (
    Alternate,
    Bool,
    Enum,
    ListOf,
    Member,
    Str,
    Struct,
    UInt32,
    Union,
)
from nbdtrack.exports import Export, ExportRegistry
from nbdtrack.tracking.checkpoint import SYNC_MODES, Checkpoints
from nbdtrack.tracking.errors import BitmapError, StateError
from nbdtrack.tracking.tracker import DirtyTracker

log = logging.getLogger("nbdtrack.control")

# The QEMU release whose QMP bitmap and export API nbdtrack follows; query-version and
# the greeting report it, with "nbdtrack VERSION" as the package.
QEMU_API_VERSION = (8, 2, 0)
PACKAGE = f"nbdtrack {__version__}"


@dataclass(frozen=True)
class Command:
    name: str
    args: Struct
    handler: Callable[..., Any]
    changes_bitmaps: bool = False
    with_session: bool = False  # the handler also takes the calling session


COMMANDS: dict[str, Command] = {}


def command(
    name: str,
    args: Struct | None = None,
    *,
    changes_bitmaps: bool = False,
    with_session: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a handler under a QMP command name."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        COMMANDS[name] = Command(
            name, args or Struct(f"q_obj_{name}-arg"), fn, changes_bitmaps, with_session
        )
        return fn

    return register


def version() -> dict:
    major, minor, micro = QEMU_API_VERSION
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": PACKAGE}


# --- argument types, as QEMU's schema names them ------------------------------------------

_NODE = Member(Str())
BLOCK_DIRTY_BITMAP = Struct("BlockDirtyBitmap", {"node": _NODE, "name": Member(Str())})
BLOCK_DIRTY_BITMAP_ADD = Struct(
    "BlockDirtyBitmapAdd",
    {
        "node": _NODE,
        "name": Member(Str()),
        "granularity": Member(UInt32(), optional=True),
        "persistent": Member(Bool(), optional=True),
        "disabled": Member(Bool(), optional=True),
    },
)
BLOCK_DIRTY_BITMAP_MERGE = Struct(
    "BlockDirtyBitmapMerge",
    {
        "node": _NODE,
        "target": Member(Str()),
        "bitmaps": Member(ListOf(Alternate("BlockDirtyBitmapOrStr", (Str(), BLOCK_DIRTY_BITMAP)))),
    },
)
BITMAP_ACTIONS = {
    "block-dirty-bitmap-add": BLOCK_DIRTY_BITMAP_ADD,
    "block-dirty-bitmap-remove": BLOCK_DIRTY_BITMAP,
    "block-dirty-bitmap-clear": BLOCK_DIRTY_BITMAP,
    "block-dirty-bitmap-enable": BLOCK_DIRTY_BITMAP,
    "block-dirty-bitmap-disable": BLOCK_DIRTY_BITMAP,
    "block-dirty-bitmap-merge": BLOCK_DIRTY_BITMAP_MERGE,
}
CHECKPOINT_START = Struct(
    "q_obj_nbdtrack-checkpoint-start-arg",
    {
        "node": _NODE,
        "bitmap": Member(Str()),
        "sync": Member(Enum("MirrorSyncMode", SYNC_MODES), optional=True),
        "name": Member(Str(), optional=True),
        "auto-abort": Member(Bool(), optional=True),
    },
)
CHECKPOINT = Struct("q_obj_nbdtrack-checkpoint-arg", {"node": _NODE, "checkpoint": Member(Str())})


TRANSACTION_ACTION = Union(
    "TransactionAction",
    {
        "abort": Struct("Abort"),
        **BITMAP_ACTIONS,
        "nbdtrack-checkpoint-start": CHECKPOINT_START,
    },
)
TRANSACTION = Struct(
    "q_obj_transaction-arg",
    {
        "actions": Member(ListOf(TRANSACTION_ACTION)),
        "properties": Member(
            Struct(
                "TransactionProperties",
                {
                    "completion-mode": Member(
                        Enum("ActionCompletionMode", ("individual", "grouped")), optional=True
                    )
                },
            ),
            optional=True,
        ),
    },
)


# --- resolving nodes and running bitmap operations ------------------------------------------


@dataclass(frozen=True)
class Step:
    """One tracker operation of a group, or the error its action must fail with."""

    tracker: DirtyTracker | None
    op: str = ""  # a tracker operation, or "checkpoint" for nbdtrack-checkpoint-start
    args: dict | None = None
    error: QMPError | None = None


class Control:
    """The control plane of one server: its exports, as QMP commands see them."""

    def __init__(self, registry: ExportRegistry) -> None:
        self.registry = registry
        self.shutting_down = False
        # Checkpoints to abort when the session that opened them goes away (auto-abort).
        self._owned: dict[int, set[tuple[str, str]]] = {}
        self._owned_lock = threading.Lock()

    def execute(self, name: str, args: dict, session: object = None) -> Any:
        """Run a command whose arguments were checked; raises QMPError."""
        cmd = COMMANDS[name]
        result = cmd.handler(self, args, session) if cmd.with_session else cmd.handler(self, args)
        if cmd.changes_bitmaps:
            log.info("%s %s", name, _describe(args))
        return result

    def own(self, session: object, node: str, checkpoint: str, owned: bool) -> None:
        with self._owned_lock:
            entries = self._owned.setdefault(id(session), set())
            (entries.add if owned else entries.discard)((node, checkpoint))

    def session_closed(self, session: object) -> None:
        """Abort the auto-abort checkpoints a closed session left open (a killed backup)."""
        with self._owned_lock:
            entries = self._owned.pop(id(session), set())
        for node, checkpoint in sorted(entries):
            try:
                finish_checkpoint(self, node, checkpoint, success=False)
                log.warning(
                    "checkpoint '%s' of '%s' aborted: its control connection closed",
                    checkpoint,
                    node,
                )
            except QMPError as err:
                log.warning("aborting checkpoint '%s' of '%s': %s", checkpoint, node, err)

    def export(self, node: str) -> Export:
        """The export a ``node`` argument names, or QEMU's unknown-node error."""
        export = self.registry.lookup(node)
        if export is None or export.name != node:  # "" is a name here, not "the default"
            raise GenericError(f"Node '{node}' not found")
        return export

    def tracker(self, node: str) -> DirtyTracker:
        """The bitmaps of a node; snapshot exports have none of their own."""
        tracker = self.export(node).tracker
        if tracker is None:
            raise GenericError(f"Node '{node}' does not support dirty bitmaps")
        return tracker

    def step(self, action: str, data: dict) -> Step:
        """The tracker operation for one bitmap action (a command or a transaction action)."""
        node = data["node"]
        if action == "nbdtrack-checkpoint-start":
            _checkpoints(self, node)
            return Step(self.tracker(node), "checkpoint", data)
        kind = action.removeprefix("block-dirty-bitmap-")
        if kind == "add":
            # QEMU checks the name first, and words an unknown node differently for add.
            if not data["name"]:
                raise GenericError("Bitmap name cannot be empty")
            try:
                self.export(node)
            except GenericError:
                raise GenericError(f"Cannot find device='{node}' nor node-name='{node}'") from None
        tracker = self.tracker(node)
        if kind == "add":
            args = {
                "name": data["name"],
                "granularity": data.get("granularity"),
                "persistent": data.get("persistent", True),
                "disabled": data.get("disabled", False),
            }
            return Step(tracker, "add", args)
        if kind == "merge":
            names = []
            for source in data["bitmaps"]:
                if isinstance(source, str):
                    names.append(source)
                    continue
                if self.export(source["node"]).name != node:
                    raise GenericError(
                        f"Bitmap '{source['name']}' is on node '{source['node']}', not on "
                        f"'{node}': nbdtrack merges bitmaps of one export only"
                    )
                names.append(source["name"])
            return Step(tracker, "merge", {"target": data["target"], "bitmaps": names})
        return Step(tracker, kind, {"name": data["name"]})

    def run_steps(self, steps: list[Step], session: object = None) -> list[Any]:
        """Run the steps in order, all or nothing across every export they touch.

        Exports that get a checkpoint are quiesced for the whole group, so checkpoints
        started together share one instant (the disks of one VM, say). Returns each
        step's result.
        """
        trackers = {id(s.tracker): s.tracker for s in steps if s.tracker is not None}
        ordered = sorted(trackers.values(), key=lambda t: t.label)
        frozen = {id(s.tracker) for s in steps if s.op == "checkpoint"}
        started: list[tuple[Export, str]] = []
        results: list[Any] = []
        try:
            with contextlib.ExitStack() as stack:
                for tracker in ordered:
                    if id(tracker) in frozen:
                        stack.enter_context(tracker.quiesced())
                run = {id(t): stack.enter_context(t.transaction()) for t in ordered}
                try:
                    for step in steps:
                        if step.error is not None:
                            raise step.error
                        assert step.tracker is not None and step.args is not None
                        if step.op == "checkpoint":
                            export, result = _start_checkpoint(self, step.args, session)
                            started.append((export, result["checkpoint"]))
                            results.append(result)
                        else:
                            run[id(step.tracker)](step.op, step.args)
                            results.append({})
                except BaseException:
                    for export, name in reversed(started):
                        finish_checkpoint(self, export.name, name, success=False)
                        self.own(session, export.name, name, False)
                    raise
        except BitmapError as err:
            raise GenericError(str(err)) from None
        except (StateError, OSError) as err:
            log.error("control: saving bitmap state failed: %s", err)
            raise GenericError(f"Cannot save the bitmap state: {err}") from None
        return results


def _describe(args: dict) -> str:
    return " ".join(f"{key}={value!r}" for key, value in args.items())


def _image_path(export: Export) -> str:
    """The image under the export's filters (the raw-file backend keeps its path)."""
    backend: Any = export.backend
    while backend is not None:
        path = getattr(backend, "path", None)
        if isinstance(path, str):
            return path
        backend = getattr(backend, "inner", None)
    return ""


def _bitmaps(export: Export) -> list[dict]:
    return export.tracker.query() if export.tracker is not None else []


# --- QMP basics ------------------------------------------------------------------------------

CAPABILITIES = Struct(
    "q_obj_qmp_capabilities-arg",
    {"enable": Member(ListOf(Enum("QMPCapability", ("oob",))), optional=True)},
)


@command("qmp_capabilities", CAPABILITIES)
def qmp_capabilities(ctl: Control, args: dict) -> dict:
    # The session answers this itself (it changes the session's state); listed here so
    # that query-commands shows it and its arguments are checked like any other.
    return {}


@command("query-version")
def query_version(ctl: Control, args: dict) -> dict:
    return version()


@command("query-commands")
def query_commands(ctl: Control, args: dict) -> list[dict]:
    return [{"name": name} for name in COMMANDS]


# --- bitmaps ---------------------------------------------------------------------------------


def _bitmap_command(action: str) -> None:
    def handler(ctl: Control, args: dict) -> dict:
        ctl.run_steps([ctl.step(action, args)])
        return {}

    command(action, BITMAP_ACTIONS[action], changes_bitmaps=True)(handler)


for _action in BITMAP_ACTIONS:
    _bitmap_command(_action)


@command("transaction", TRANSACTION, changes_bitmaps=True, with_session=True)
def transaction(ctl: Control, args: dict, session: object) -> dict:
    steps = []
    for action in args["actions"]:
        if action["type"] == "abort":
            steps.append(Step(None, error=GenericError("Transaction aborted using Abort action")))
            continue
        try:
            steps.append(ctl.step(action["type"], action["data"]))
        except GenericError as err:
            steps.append(Step(None, error=err))  # fails in its turn, after the actions before it
    ctl.run_steps(steps, session)
    return {}


# --- exports and nodes -------------------------------------------------------------------------


@command("query-block-exports")
def query_block_exports(ctl: Control, args: dict) -> list[dict]:
    return [
        {"id": e.name, "type": "nbd", "node-name": e.name, "shutting-down": ctl.shutting_down}
        for e in ctl.registry.listing()
    ]


@command(
    "query-named-block-nodes",
    Struct("q_obj_query-named-block-nodes-arg", {"flat": Member(Bool(), optional=True)}),
)
def query_named_block_nodes(ctl: Control, args: dict) -> list[dict]:
    nodes = []
    for export in ctl.registry.listing():
        path = _image_path(export)
        nodes.append(
            {
                "node-name": export.name,
                "file": path,
                "ro": export.read_only,
                "drv": "raw",
                "backing_file_depth": 0,
                "encrypted": False,
                "detect_zeroes": "off",
                "bps": 0,
                "bps_rd": 0,
                "bps_wr": 0,
                "iops": 0,
                "iops_rd": 0,
                "iops_wr": 0,
                "write_threshold": 0,
                "cache": {"writeback": True, "direct": False, "no-flush": False},
                "image": {
                    "filename": path,
                    "format": "raw",
                    "virtual-size": export.size,
                    "dirty-flag": False,
                },
                "dirty-bitmaps": _bitmaps(export),
            }
        )
    return nodes


@command(
    "nbdtrack-query-exports",
    Struct("q_obj_nbdtrack-query-exports-arg", {"name": Member(Str(), optional=True)}),
)
def nbdtrack_query_exports(ctl: Control, args: dict) -> list[dict]:
    """nbdtrack's own view: every export (or the one named) with its bitmaps."""
    exports = [ctl.export(args["name"])] if "name" in args else list(ctl.registry.listing())
    return [
        {
            "name": e.name,
            "description": e.description,
            "size": e.size,
            "read-only": e.read_only,
            "image": _image_path(e),
            "bitmaps": _bitmaps(e),
            "stats": e.stats.as_dict(),
        }
        for e in exports
    ]


# --- checkpoints (nbdtrack's own) ---------------------------------------------------------------


def _checkpoints(ctl: Control, node: str) -> Checkpoints:
    checkpoints = ctl.export(node).checkpoints
    if checkpoints is None:
        raise GenericError(f"Node '{node}' does not support checkpoints")
    return checkpoints


@command("nbdtrack-checkpoint-start", CHECKPOINT_START, changes_bitmaps=True, with_session=True)
def checkpoint_start(ctl: Control, args: dict, session: object) -> dict:
    """Freeze a bitmap and publish the snapshot export NODE@CHECKPOINT."""
    return ctl.run_steps([ctl.step("nbdtrack-checkpoint-start", args)], session)[0]


def _start_checkpoint(ctl: Control, args: dict, session: object) -> tuple[Export, dict]:
    export = ctl.export(args["node"])
    checkpoints = _checkpoints(ctl, args["node"])
    checkpoint = checkpoints.start(args["bitmap"], args.get("sync", "on-success"), args.get("name"))
    snapshot = export.snapshot_export(checkpoint)
    try:
        ctl.registry.add(snapshot)
    except ValueError as err:
        checkpoints.finish(checkpoint.name, success=False)
        raise GenericError(str(err)) from None
    if args.get("auto-abort", False):
        ctl.own(session, export.name, checkpoint.name, True)
    return export, {
        "checkpoint": checkpoint.name,
        "export": snapshot.name,
        "bitmap": checkpoint.bitmap,
        "sync": checkpoint.sync,
        "generation": checkpoint.generation,
    }


def finish_checkpoint(ctl: Control, node: str, name: str, success: bool) -> dict:
    checkpoints = _checkpoints(ctl, node)
    checkpoint = checkpoints.open.get(name)
    if checkpoint is None:
        raise GenericError(f"Checkpoint '{name}' not found on node '{node}'")
    snapshot_name = f"{node}@{name}"
    if ctl.registry.lookup(snapshot_name) is not None:
        ctl.registry.remove(snapshot_name)
    try:
        generation = checkpoints.finish(name, success)
    except (BitmapError, StateError, OSError) as err:
        raise GenericError(f"Cannot finish checkpoint '{name}': {err}") from None
    return {"bitmap": checkpoint.bitmap, "generation": generation}


@command("nbdtrack-checkpoint-commit", CHECKPOINT, changes_bitmaps=True, with_session=True)
def checkpoint_commit(ctl: Control, args: dict, session: object) -> dict:
    """The backup succeeded: drop the copied bits as the sync mode says."""
    result = finish_checkpoint(ctl, args["node"], args["checkpoint"], success=True)
    ctl.own(session, args["node"], args["checkpoint"], False)
    return result


@command("nbdtrack-checkpoint-abort", CHECKPOINT, changes_bitmaps=True, with_session=True)
def checkpoint_abort(ctl: Control, args: dict, session: object) -> dict:
    """The backup failed: keep the bits (sync=always: drop only what was released)."""
    result = finish_checkpoint(ctl, args["node"], args["checkpoint"], success=False)
    ctl.own(session, args["node"], args["checkpoint"], False)
    return result
