"""Fault injection: a filter that fails chosen backend calls, like nbdkit's error filter.

Used by tests (and for rehearsing failures): rules name an operation, an optional byte
range, the errno to raise, how often, and with what probability. The filter sits right
above the storage backend, under dirty tracking, so a write it fails has already been
marked dirty, as a real device error would find it.

Rules file (JSON, or TOML with a ``[[fault]]`` table per rule)::

    {"seed": 1, "faults": [
      {"op": "write", "errno": "EIO", "start": 1048576, "end": 2097152, "count": 1},
      {"op": "read", "errno": "EIO", "probability": 0.5, "export": "disk"},
      {"op": "trim", "errno": "ENOSPC", "skip": 2},
      {"op": "write", "short": true}
    ]}

Keys: ``op`` (read, write, zero, trim, flush, cache, or any), ``errno`` (a name such as
EIO, ENOSPC, EDQUOT, EPERM, ENOMEM, EINVAL, or a number; default EIO), ``start``/``end``
(the rule fires for calls overlapping [start, end); flush has no range and always
overlaps), ``skip`` (let this many matching calls through first), ``count`` (fire at most
this many times; default unlimited), ``probability`` (0..1, default 1, drawn from a
generator seeded by ``seed``), ``short`` (read: return the first half of the data and
no error — the server must notice; write/zero/trim: apply the first half of the range,
then fail with ``errno``), ``export`` (only for that export).
"""

from __future__ import annotations

import errno as errno_module
import json
import logging
import os
import random
import threading
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

from nbdtrack.storage.backend import Backend, Filter

log = logging.getLogger("nbdtrack.faults")

OPERATIONS = ("read", "write", "zero", "trim", "flush", "cache", "any")
_RULE_KEYS = {
    "op",
    "errno",
    "start",
    "end",
    "skip",
    "count",
    "probability",
    "short",
    "export",
}


class FaultConfigError(ValueError):
    """A rules file that cannot be used; the message is one line."""


@dataclass
class FaultRule:
    op: str
    errno: int = errno_module.EIO
    start: int = 0
    end: int | None = None
    skip: int = 0
    count: int | None = None
    probability: float = 1.0
    short: bool = False
    export: str | None = None
    seen: int = 0  # matching calls so far
    fired: int = 0  # faults injected so far

    def matches(self, op: str, offset: int, length: int) -> bool:
        if self.op not in ("any", op):
            return False
        if op == "flush":
            return True
        end = self.end if self.end is not None else float("inf")
        return offset < end and offset + max(length, 1) > self.start


@dataclass
class FaultPlan:
    """Every rule of a rules file; ``for_export`` hands each export its own."""

    rules: list[FaultRule] = field(default_factory=list)
    seed: int | None = None

    def for_export(self, name: str) -> list[FaultRule]:
        """Fresh copies of the rules for ``name``: ``skip`` and ``count`` are per export."""
        return [replace(r) for r in self.rules if r.export is None or r.export == name]


def _errno(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise FaultConfigError(f"{where}: 'errno' must be a name or a number")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isupper() and hasattr(errno_module, value):
        return int(getattr(errno_module, value))
    raise FaultConfigError(f"{where}: unknown errno '{value}'")


def _int(entry: dict, key: str, where: str, default: int | None) -> int | None:
    value = entry.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FaultConfigError(f"{where}: '{key}' must be a non-negative integer")
    return value


def parse_rules(data: Any, source: str = "faults") -> FaultPlan:
    """A ``FaultPlan`` from parsed JSON/TOML: {"seed": N, "faults": [rule, ...]}."""
    if isinstance(data, list):
        data = {"faults": data}
    if not isinstance(data, dict):
        raise FaultConfigError(f"{source}: expected a table with a 'faults' list")
    unknown = sorted(set(data) - {"seed", "faults", "fault"})
    if unknown:
        raise FaultConfigError(f"{source}: unknown key '{unknown[0]}'")
    entries = data.get("faults", data.get("fault", []))
    if not isinstance(entries, list):
        raise FaultConfigError(f"{source}: 'faults' must be a list")
    seed = _int(data, "seed", source, None)
    rules = []
    for i, entry in enumerate(entries):
        where = f"{source}: fault[{i}]"
        if not isinstance(entry, dict):
            raise FaultConfigError(f"{where}: expected a table")
        bad = sorted(set(entry) - _RULE_KEYS)
        if bad:
            raise FaultConfigError(f"{where}: unknown key '{bad[0]}'")
        op = entry.get("op")
        if op not in OPERATIONS:
            raise FaultConfigError(f"{where}: 'op' must be one of {', '.join(OPERATIONS)}")
        probability = entry.get("probability", 1.0)
        if isinstance(probability, bool) or not isinstance(probability, int | float):
            raise FaultConfigError(f"{where}: 'probability' must be a number")
        if not 0 <= probability <= 1:
            raise FaultConfigError(f"{where}: 'probability' must be between 0 and 1")
        short = entry.get("short", False)
        if not isinstance(short, bool):
            raise FaultConfigError(f"{where}: 'short' must be true or false")
        if short and op in ("flush", "cache", "any"):
            raise FaultConfigError(f"{where}: 'short' needs op read, write, zero or trim")
        export = entry.get("export")
        if export is not None and not isinstance(export, str):
            raise FaultConfigError(f"{where}: 'export' must be a string")
        start = _int(entry, "start", where, 0) or 0
        end = _int(entry, "end", where, None)
        if end is not None and end <= start:
            raise FaultConfigError(f"{where}: 'end' must be past 'start'")
        rules.append(
            FaultRule(
                op=op,
                errno=_errno(entry.get("errno", "EIO"), where),
                start=start,
                end=end,
                skip=_int(entry, "skip", where, 0) or 0,
                count=_int(entry, "count", where, None),
                probability=float(probability),
                short=short,
                export=export,
            )
        )
    return FaultPlan(rules, seed)


def load_rules(path: str) -> FaultPlan:
    """Read a rules file: TOML when it ends in .toml, else JSON."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise FaultConfigError(f"{path}: cannot read: {err.strerror}") from None
    try:
        data = tomllib.loads(raw.decode()) if path.endswith(".toml") else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise FaultConfigError(f"{path}: cannot parse: {err}") from None
    return parse_rules(data, path)


class FaultFilter(Filter):
    """Fails calls that match a rule; everything else passes through unchanged."""

    def __init__(self, inner: Backend, rules: list[FaultRule], seed: int | None = None) -> None:
        super().__init__(inner)
        self.rules = rules
        self._random = random.Random(seed)
        self._lock = threading.Lock()  # backend calls run in many worker threads

    def _fault(self, op: str, offset: int = 0, length: int = 0) -> FaultRule | None:
        with self._lock:
            for rule in self.rules:
                if not rule.matches(op, offset, length):
                    continue
                rule.seen += 1
                if rule.seen <= rule.skip:
                    continue
                if rule.count is not None and rule.fired >= rule.count:
                    continue
                if rule.probability < 1 and self._random.random() >= rule.probability:
                    continue
                rule.fired += 1
                log.info(
                    "injecting %s on %s at %d+%d",
                    "a short result" if rule.short else errno_module.errorcode.get(rule.errno),
                    op,
                    offset,
                    length,
                )
                return rule
        return None

    @staticmethod
    def _raise(rule: FaultRule, op: str) -> NoReturn:
        raise OSError(rule.errno, f"injected fault on {op}: {os.strerror(rule.errno)}")

    def pread(self, length: int, offset: int) -> bytes:
        rule = self._fault("read", offset, length)
        if rule is None:
            return self.inner.pread(length, offset)
        if rule.short:
            return self.inner.pread(length // 2, offset)
        self._raise(rule, "read")

    def pwrite(self, data: bytes | memoryview, offset: int, fua: bool = False) -> None:
        rule = self._fault("write", offset, len(data))
        if rule is None:
            return self.inner.pwrite(data, offset, fua)
        if rule.short and len(data) > 1:
            self.inner.pwrite(memoryview(data)[: len(data) // 2], offset, fua)
        self._raise(rule, "write")

    def zero(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fast: bool = False,
        fua: bool = False,
    ) -> None:
        rule = self._fault("zero", offset, length)
        if rule is None:
            return self.inner.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)
        if rule.short and length > 1:
            self.inner.zero(offset, length // 2, may_trim=may_trim, fast=fast, fua=fua)
        self._raise(rule, "zero")

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        rule = self._fault("trim", offset, length)
        if rule is None:
            return self.inner.trim(offset, length, fua)
        if rule.short and length > 1:
            self.inner.trim(offset, length // 2, fua)
        self._raise(rule, "trim")

    def flush(self) -> None:
        rule = self._fault("flush")
        if rule is None:
            return self.inner.flush()
        self._raise(rule, "flush")

    def cache(self, offset: int, length: int) -> None:
        rule = self._fault("cache", offset, length)
        if rule is None:
            return self.inner.cache(offset, length)
        self._raise(rule, "cache")
