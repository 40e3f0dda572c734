"""The wire schemas as a reviewed snapshot, and the rule that keeps them additive.

`libs/common/tests/unit/contract_schemas.json` holds the JSON schema of every registered message. A change
to a message is additive when every field it had keeps its schema and every new field is optional: an older
consumer then reads a newer producer's message (unknown fields are ignored) and a newer consumer an older
one. Anything else (a field removed, retyped or made required, a message removed) is a new class with
VERSION + 1 and an upcaster from the old version (`contracts.base.upcaster`), which the check accepts.

    python -m timbre_common.contracts.snapshot           # what changed against the snapshot, and whether it may
    python -m timbre_common.contracts.snapshot --write   # record the current schemas (refused if breaking)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import REGISTRY, UPCASTERS

SNAPSHOT = Path(__file__).resolve().parents[3] / "tests" / "unit" / "contract_schemas.json"
# Words about a field, not its shape.
_NOTES = frozenset({"title", "description", "default", "examples"})


def current() -> dict[str, Any]:
    """Every message of the platform's contracts: its kind, whether it carries a binary body, its JSON schema."""
    out: dict[str, Any] = {}
    for (type_, version), cls in sorted(REGISTRY.items()):
        if not cls.__module__.startswith(__package__ + "."):
            continue  # a message a test or a tool defined for itself
        kind = next(base.__name__ for base in cls.__mro__ if base.__name__ in {"Event", "Command", "Reply"})
        out[f"{type_} v{version}"] = {"kind": kind, "binary": cls.BINARY, "schema": cls.model_json_schema()}
    return out


def _shape(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _shape(v) for k, v in schema.items() if k not in _NOTES}
    if isinstance(schema, list):
        return [_shape(v) for v in schema]
    return schema


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return root.get("$defs", {}).get(ref.removeprefix("#/$defs/"), {})
    return schema


def _object_changes(old: dict[str, Any], new: dict[str, Any], old_root: dict[str, Any], new_root: dict[str, Any],
                    where: str) -> list[str]:
    problems: list[str] = []
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    for name, old_field in old_props.items():
        if name not in new_props:
            problems.append(f"{where}.{name} removed")
            continue
        a, b = _resolve(old_field, old_root), _resolve(new_props[name], new_root)
        if "properties" in a and "properties" in b:  # a nested model: the same rules inside it
            problems += _object_changes(a, b, old_root, new_root, f"{where}.{name}")
        elif _shape(a) != _shape(b):
            problems.append(f"{where}.{name} changed from {json.dumps(_shape(a))} to {json.dumps(_shape(b))}")
    newly_required = set(new.get("required", [])) - set(old.get("required", []))
    for name in sorted(newly_required):
        problems.append(f"{where}.{name} is required now" + ("" if name in old_props else " (a new field)"))
    return problems


def breaking_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What in `new` an older reader or writer of `old` would break on (empty: additive)."""
    problems: list[str] = []
    for key, before in old.items():
        type_, _, version = key.rpartition(" v")
        upcast = (type_, int(version)) in UPCASTERS
        after = new.get(key)
        if after is None:
            if not upcast:
                problems.append(f"{key} removed without an upcaster to its next version")
            continue
        if upcast:
            continue  # read through its upcaster; the old class stays for what is still in flight
        if (before["kind"], before["binary"]) != (after["kind"], after["binary"]):
            problems.append(f"{key} changed kind or binary body")
        problems += _object_changes(before["schema"], after["schema"], before["schema"], after["schema"], key)
    return problems


def load(path: Path = SNAPSHOT) -> dict[str, Any]:
    return json.loads(path.read_text())


def write(path: Path = SNAPSHOT) -> None:
    path.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="record the current schemas (refused if breaking)")
    parser.add_argument("--path", type=Path, default=SNAPSHOT)
    args = parser.parse_args(argv)
    now = current()
    old = load(args.path) if args.path.exists() else {}
    problems = breaking_changes(old, now)
    added = sorted(set(now) - set(old))
    changed = sorted(k for k in set(now) & set(old) if now[k] != old[k])
    for line in problems:
        print(f"breaking: {line}")
    for key in added:
        print(f"new: {key}")
    for key in changed:
        print(f"changed: {key}")
    if problems:
        print("a breaking change needs a new VERSION of the message and an upcaster from the old one", file=sys.stderr)
        return 1
    if args.write:
        write(args.path)
        print(f"wrote {len(now)} schemas to {args.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
