"""Command arguments checked the way QEMU's QAPI input visitor checks them.

A type checks a JSON value found at a path (``granularity``, ``bitmaps[1].node``,
``actions[0].data.name``) and raises GenericError worded as QEMU words it, so a script
that handles QEMU's errors handles these too. Checked structs come back as dicts with
only the members that were given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nbdtrack.control.errors import GenericError


def _wrong_type(path: str, expected: str) -> GenericError:
    return GenericError(f"Invalid parameter type for '{path or 'null'}', expected: {expected}")


class Type:
    """A QAPI type; ``name`` is how QEMU's messages call it."""

    name = "any"

    def check(self, value: Any, path: str) -> Any:
        return value


class Str(Type):
    name = "string"

    def check(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise _wrong_type(path, self.name)
        return value


class Bool(Type):
    name = "boolean"

    def check(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise _wrong_type(path, self.name)
        return value


class Int(Type):
    name = "integer"

    def check(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(path, self.name)
        return value


class UInt32(Int):
    def check(self, value: Any, path: str) -> int:
        value = super().check(value, path)
        if not 0 <= value < 1 << 32:
            raise GenericError(f"Parameter '{path}' expects uint32_t")
        return value


class Enum(Type):
    def __init__(self, name: str, values: tuple[str, ...]) -> None:
        self.name = name
        self.values = values

    def check(self, value: Any, path: str) -> str:
        Str().check(value, path)
        if value not in self.values:
            raise GenericError(f"Parameter '{path}' does not accept value '{value}'")
        return value


class ListOf(Type):
    name = "array"

    def __init__(self, item: Type) -> None:
        self.item = item

    def check(self, value: Any, path: str) -> list:
        if not isinstance(value, list):
            raise _wrong_type(path, self.name)
        return [self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value)]


@dataclass
class Member:
    type: Type
    optional: bool = False


def _member_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Struct(Type):
    """An object with declared members; members are checked in declaration order."""

    def __init__(self, name: str, members: dict[str, Member] | None = None) -> None:
        self.name = name
        self.members = members or {}

    def check(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            raise _wrong_type(path, "object")
        out = {}
        for key, member in self.members.items():
            if key in value:
                out[key] = member.type.check(value[key], _member_path(path, key))
            elif not member.optional:
                raise GenericError(f"Parameter '{_member_path(path, key)}' is missing")
        for key in value:
            if key not in self.members:
                raise GenericError(f"Parameter '{_member_path(path, key)}' is unexpected")
        return out


class Alternate(Type):
    """One of several types told apart by their JSON type (QEMU: a string or an object)."""

    def __init__(self, name: str, choices: tuple[Type, ...]) -> None:
        self.name = name
        self.choices = choices

    def check(self, value: Any, path: str) -> Any:
        for choice in self.choices:
            if isinstance(choice, Struct):
                if isinstance(value, dict):
                    return choice.check(value, path)
            elif not isinstance(value, dict):
                try:
                    return choice.check(value, path)
                except GenericError:
                    pass  # not this scalar type: try the next
        raise _wrong_type(path, self.name)


class Union(Type):
    """QEMU's ``{"type": KIND, "data": {...}}`` union, as ``transaction`` actions are."""

    def __init__(self, name: str, branches: dict[str, Struct]) -> None:
        self.name = name
        self.branches = branches

    def check(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            raise _wrong_type(path, "object")
        kind_path = _member_path(path, "type")
        if "type" not in value:
            raise GenericError(f"Parameter '{kind_path}' is missing")
        kind = Enum(f"{self.name}Kind", tuple(self.branches)).check(value["type"], kind_path)
        data_path = _member_path(path, "data")
        if "data" not in value:
            raise GenericError(f"Parameter '{data_path}' is missing")
        data = self.branches[kind].check(value["data"], data_path)
        for key in value:
            if key not in ("type", "data"):
                raise GenericError(f"Parameter '{_member_path(path, key)}' is unexpected")
        return {"type": kind, "data": data}
