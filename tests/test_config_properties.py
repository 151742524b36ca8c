"""Property-based tests of the config loader: whatever the text, the loader answers a valid
`SluiceConfig` or a `ConfigError` whose every line names the file and the line, never anything else."""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sluice import DEMO_CONFIG
from sluice.proxy.config import ConfigError, SluiceConfig, parse_config

SOURCE = "fuzz.yaml"
# file:line: path: message, or file: message for errors about the whole document.
ERROR_LINE = re.compile(rf"^{re.escape(SOURCE)}(:\d+)?: .+")
KEYS = ["listen", "admin", "clusters", "routes", "chain", "filters_dir", "access_log", "cache_dir",
        "max_body_buffer", "max_request_header_size", "drain_timeout", "endpoints", "timeout", "match",
        "prefix", "cluster", "name", "module", "config", "failure_policy", "headers", "methods", "regex"]
PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check(text: str, base: Path) -> None:
    try:
        config = parse_config(text, source=SOURCE, base_dir=base)
    except ConfigError as exc:
        assert exc.errors, "a ConfigError must say what is wrong"
        for line in exc.errors:
            assert ERROR_LINE.match(line), line
            assert "Traceback" not in line
        return
    assert isinstance(config, SluiceConfig)


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True),
    st.text(string.printable, max_size=20), st.sampled_from(["127.0.0.1:8080", "[::1]:80", "web", "/", "1k"]),
)
values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8),
                                                                inner, max_size=5),
    max_leaves=25,
)


@PROFILE
@given(st.text(max_size=400))
@example("\x1f")  # found by this test: the YAML reader's own error escaped as a traceback
@example("listen: 127.0.0.1:80\nclusters: {web: {endpoints: [\"127.0.0.1:1\"]}}\x00")
def test_any_text(tmp_path_factory: Any, text: str) -> None:
    check(text, tmp_path_factory.getbasetemp())


@PROFILE
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=8))
def test_any_document_of_known_keys(tmp_path_factory: Any, document: dict[str, Any]) -> None:
    check(yaml.safe_dump(document, default_flow_style=False), tmp_path_factory.getbasetemp())


DEMO_LINES = DEMO_CONFIG.read_text().splitlines()


@PROFILE
@given(st.lists(st.tuples(st.integers(0, len(DEMO_LINES) - 1), st.sampled_from(["drop", "dup", "value", "indent"]),
                          scalars), min_size=1, max_size=4))
def test_mutations_of_the_demo_config(tmp_path_factory: Any, edits: list[tuple[int, str, Any]]) -> None:
    lines = list(DEMO_LINES)
    for index, kind, value in edits:
        index %= len(lines)
        if kind == "drop":
            del lines[index]
        elif kind == "dup":
            lines.insert(index, lines[index])
        elif kind == "indent":
            lines[index] = "  " + lines[index]
        elif ":" in lines[index]:
            key = lines[index].split(":", 1)[0]
            lines[index] = f"{key}: {yaml.safe_dump(value, default_flow_style=True).strip().splitlines()[0]}"
        if not lines:
            lines.append("")
    check("\n".join(lines), DEMO_CONFIG.parent)
