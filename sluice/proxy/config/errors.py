"""The config's error prose: how a problem, its place in the file and the offending value read.

Every problem is reported as ``file:line: yaml.path: message``; this module turns a path into
``chain[0].config``, a pydantic error into a sentence, and a YAML value into words.
"""

from __future__ import annotations

import difflib
import json
import re
import types
from collections.abc import Mapping
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import ErrorDetails

__all__ = ["ConfigError", "Loc", "describe", "format_loc", "message"]

Loc = tuple[str | int, ...]
"""A path into the config: keys and list indices, e.g. ("chain", 0, "name")."""


class ConfigError(Exception):
    """The configuration is invalid. `errors` holds one ``file:line: path: message`` per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


def describe(value: object) -> str:
    """How a YAML value reads back to the user in an error message (never a Python repr dump)."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return repr(value)
    return str(value)


_SIMPLE_KEY_RE = re.compile(r"[A-Za-z0-9_:-]+")


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _SIMPLE_KEY_RE.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out or "(top level)"


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X (field annotations as pydantic resolved them)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _model_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """Which model validates the value at `loc` (to list the keys it allows)."""
    current: Any = root
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) in (list, dict):
            current = get_args(current)[-1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unknown_key(root: type[BaseModel], loc: Loc) -> str:
    key = str(loc[-1])
    model = _model_at(root, loc[:-1])
    if model is None:
        return f"unknown key {key!r}"
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f"unknown key {key!r}; did you mean {close[0]!r}?"
    return f"unknown key {key!r} (allowed: {', '.join(allowed)})"


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def message(error: ErrorDetails, root: type[BaseModel]) -> str:
    """One pydantic error as a sentence; `root` is the model the whole file was validated with."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    got = describe(value)
    if kind == "invalid_key":
        return f"keys must be strings (got {describe(error['loc'][-1])})"
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return _unknown_key(root, error["loc"])
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        return f"must be one of {expected} (got {got})"
    if kind == "string_type":
        hint = "; put it in quotes if it is meant as text" if isinstance(value, bool) or value is None else ""
        return f"must be a string (got {got}){hint}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be a whole number (got {got})"
    if kind in ("float_type", "float_parsing", "finite_number"):
        return f"must be a number (got {got})"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false (got {got})"
    if kind == "list_type":
        return f"must be a list (got {got})"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping (got {got})"
    if kind == "path_type":
        return f"must be a path (got {got})"
    if kind == "greater_than":
        return f"must be greater than {_number(ctx.get('gt'))} (got {got})"
    if kind == "greater_than_equal":
        return f"must be at least {_number(ctx.get('ge'))} (got {got})"
    if kind == "too_short":
        if ctx.get("min_length") == 1:
            return "must not be empty"
        return f"must have at least {ctx.get('min_length')} items"
    if kind == "string_too_short":
        return "must not be empty"
    return str(error["msg"])
