"""Validators for the MCP tasks extension messages in tests/data/mcp-tasks-extension.schema.json."""

import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from jsonschema.exceptions import best_match  # type: ignore[import-untyped]
from jsonschema.protocols import Validator  # type: ignore[import-untyped]

SCHEMA_PATH = Path(__file__).parent / "data" / "mcp-tasks-extension.schema.json"


@cache
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return loaded


@cache
def validator_for(name: str) -> Validator:
    """A validator for one `$defs` entry, e.g. "GetTaskResult"."""
    defs = schema()["$defs"]
    if name not in defs:
        raise KeyError(f"no $defs/{name} in {SCHEMA_PATH.name}")
    # The defs refer to each other as "#/$defs/...", so they travel with the $ref.
    wrapper = {"$ref": f"#/$defs/{name}", "$defs": defs}
    # Without a format checker "format": "date-time" would only be an annotation.
    validator: Validator = Draft202012Validator(
        wrapper, format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    return validator


def assert_valid(name: str, instance: object) -> None:
    """Raise AssertionError listing every error, each with its JSON path, if `instance` is not
    a valid `$defs/<name>`."""
    errors = sorted(validator_for(name).iter_errors(instance), key=lambda e: e.json_path)
    if not errors:
        return
    lines = [f"not a valid {name}:"]
    for error in errors:
        lines.append(f"  {error.json_path}: {error.message}")
        # A failed oneOf only says "not valid under any of the given schemas"; say why.
        lines += [f"    because {cause.json_path}: {cause.message}" for cause in _causes(error)]
    raise AssertionError("\n".join(lines))


def _causes(error: Any) -> Iterable[Any]:
    """The errors inside a failed oneOf/anyOf that explain it.

    The DetailedTask variants are told apart by a `status` const, so the branches that failed
    only because the status is another variant's are noise; the rest are the reasons."""
    if not error.context:
        return []
    branches: dict[int, list[Any]] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)

    def wrong_status(sub: Any) -> bool:
        return sub.validator == "const" and list(sub.relative_path) == ["status"]

    matching = [errors for errors in branches.values() if not any(map(wrong_status, errors))]
    if matching:
        return [sub for errors in matching for sub in errors]
    # No variant has this status: the status itself is the cause (Task's enum says so once).
    status_errors = {
        sub.message: sub
        for sub in error.context
        if list(sub.relative_path) == ["status"] and not wrong_status(sub)
    }
    return list(status_errors.values()) or [best_match(error.context)]
