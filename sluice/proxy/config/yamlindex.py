"""The YAML line index: which line of the file every key and list item is on.

The YAML is composed into nodes first (which keep their line numbers), the line of every mapping
key and sequence item is indexed by its path, and only then are the nodes turned into plain
Python values. A validation error's path then finds its line here. The loader also reads YAML
1.2 booleans and no timestamps, and explains a YAML syntax error in the config's terms.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import yaml

from .errors import ConfigError, Loc

__all__ = ["LineIndex", "line_for", "line_key", "load_yaml"]

LineIndex = dict[tuple[str, ...], int]
"""Path (every part as a string) -> 1-based line."""

_BOOL_TAG = "tag:yaml.org,2002:bool"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"


# `listen: [::1]:8080` unquoted is a YAML flow sequence followed by junk: a syntax error whose
# message says nothing about addresses.
_BARE_IPV6_RE = re.compile(r"(?<![\"'])\[[0-9A-Fa-f:.%]*\]:\d")


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and no timestamps.

    YAML 1.1 reads `on`, `off`, `yes`, `no` as booleans and `2024-01-01` as a date; in a header
    value or a filter's JSON config those are nearly always meant as text (and a date is not JSON).
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _index_lines(
    node: yaml.Node,
    loc: Loc,
    lines: LineIndex,
    duplicates: list[tuple[Loc, int, str]],
    active: set[int],
) -> None:
    """Record the 1-based line of every mapping key and sequence item under `node`, by path."""
    if id(node) in active:  # a recursive alias (`&a [*a]`)
        return
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            # Merge keys (`<<: *defaults`) and complex keys have no path of their own; their
            # values' errors fall back to the enclosing key's line.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            child: Loc = (*loc, key)
            if key in first_line:
                duplicates.append(
                    (child, line, f"duplicate key {key!r} (first given on line {first_line[key]})")
                )
                continue
            first_line[key] = line
            lines[line_key(child)] = line
            _index_lines(value_node, child, lines, duplicates, active)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*loc, index)
            lines[line_key(child)] = item.start_mark.line + 1
            _index_lines(item, child, lines, duplicates, active)
    active.discard(id(node))


def line_key(loc: Loc) -> tuple[str, ...]:
    # pydantic reports list indices as ints and dict keys as (possibly coerced) strings; strings
    # on both sides make `("routes", 0)` and a YAML key "0" compare equal where they must.
    return tuple(str(part) for part in loc)


def load_yaml(text: str, source: str) -> tuple[object, LineIndex, list[tuple[Loc, int, str]]]:
    """The data of a YAML document, its line index and its duplicate keys (path, line, message).

    Raises ConfigError for a syntax error, naming the line.
    """
    try:
        # The loader's reader rejects non-printable characters as soon as it is made.
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, max(exc.position, 0)) + 1
        raise ConfigError([f"{source}:{line}: YAML syntax error: unacceptable character #x{exc.character:04x} "
                           "(control characters are not allowed)"]) from None
    try:
        node = loader.get_single_node()
        lines: LineIndex = {}
        duplicates: list[tuple[Loc, int, str]] = []
        if node is None:
            return None, lines, duplicates
        lines[()] = node.start_mark.line + 1
        _index_lines(node, (), lines, duplicates, set())
        data = loader.construct_document(node)
        return data, lines, duplicates
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        message = exc.problem or exc.context or "invalid YAML"
        if exc.problem and exc.context:
            if exc.problem.startswith("but "):  # the composer's "expected X ... but found Y"
                message = f"{exc.context}, {exc.problem}"
            else:
                message += f" ({exc.context}"
                if exc.context_mark is not None and exc.context_mark.line + 1 != line:
                    message += f" that starts on line {exc.context_mark.line + 1}"
                message += ")"
        source_lines = text.splitlines()
        if 0 < line <= len(source_lines) and _BARE_IPV6_RE.search(source_lines[line - 1]):
            message += '; an IPv6 address must be quoted, e.g. "[::1]:8080"'
        raise ConfigError([f"{source}:{line}: YAML syntax error: {message}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: YAML error: {exc}"]) from None
    finally:
        loader.dispose()


def line_for(lines: Mapping[tuple[str, ...], int], loc: Loc) -> int:
    """The line of `loc`, or of its nearest ancestor present in the file (e.g. for missing keys)."""
    key = line_key(loc)
    while key:
        if key in lines:
            return lines[key]
        key = key[:-1]
    return lines.get((), 1)
