"""The `capabilities:` and `limits:` blocks of a chain entry (issue 13, items 7 and 8)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sluice import DEMO_CONFIG, abi
from sluice.proxy.config import ConfigError, load_config, parse_config


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), source="t.yaml", base_dir=Path("."))
    errors: list[str] = info.value.errors
    return errors


def test_without_the_blocks_a_filter_gets_todays_capabilities_and_the_default_limits() -> None:
    config = parse_config("listen: 127.0.0.1:1\nchain: [{name: f, module: f.wasm}]\n", base_dir=Path("."))
    spec = config.chain[0].to_plugin_spec()
    assert spec.capabilities == abi.Capabilities()
    assert spec.limits == abi.FilterLimits()
    everything = abi.Capabilities()
    assert everything.http_call is None and everything.properties is None and everything.local_reply


def test_the_demo_config_narrows_nothing() -> None:
    for entry in load_config(DEMO_CONFIG).chain:
        spec = entry.to_plugin_spec()
        assert spec.capabilities == abi.Capabilities() and spec.limits == abi.FilterLimits()


def test_blocks_reach_the_plugin_spec() -> None:
    config = parse_config(
        textwrap.dedent("""\
        listen: 127.0.0.1:1
        clusters:
          auth: {endpoints: ["127.0.0.1:9"]}
        chain:
          - name: f
            module: f.wasm
            environment: {A: "1", B: "2"}
            capabilities:
              http_call: [auth, "10.0.0.1:80"]
              shared_data_write: false
              queue_vm_ids: [metrics]
              properties: [request.*, connection, node.id]
              environment: [A]
              local_reply: false
            limits:
              max_callouts: 4
              max_header_bytes: 16KiB
              max_body_bytes: 2MiB
              max_metrics: 10
        """),
        base_dir=Path("."),
    )
    spec = config.chain[0].to_plugin_spec()
    assert spec.capabilities == abi.Capabilities(
        http_call=("auth", "10.0.0.1:80"), shared_data_write=False, queue_vm_ids=("metrics",),
        properties=("request", "connection", "node.id"), environment=("A",), local_reply=False,
    )
    assert spec.limits == abi.FilterLimits(max_callouts=4, max_header_bytes=16 << 10, max_body_bytes=2 << 20,
                                           max_metrics=10)


def test_block_errors_name_their_line() -> None:
    errors = errors_of(
        """\
        listen: 127.0.0.1:1
        clusters:
          auth: {endpoints: ["127.0.0.1:9"]}
        chain:
          - name: f
            module: f.wasm
            capabilities:
              http_call: [auth, billing]
              properties: ["request..path"]
              colour: red
            limits:
              max_callouts: 0
              max_body_bytes: lots
          - name: g
            module: g.wasm
            environment: {A: "1"}
            capabilities: {environment: [A, SECRET]}
        """
    )
    assert errors == [
        "t.yaml:8: chain[0].capabilities.http_call[1]: unknown cluster 'billing' (clusters: auth)",
        "t.yaml:9: chain[0].capabilities.properties: invalid property prefix 'request..path' "
        "(dotted names, e.g. request.* or node.id)",
        "t.yaml:10: chain[0].capabilities.colour: unknown key 'colour' (allowed: http_call, shared_data_write, "
        "queue_vm_ids, properties, environment, local_reply)",
        "t.yaml:12: chain[0].limits.max_callouts: must be greater than 0 (got 0)",
        "t.yaml:13: chain[0].limits.max_body_bytes: must be a size in bytes: a whole number or a string like "
        "\"64MiB\", \"512KiB\", \"1GiB\" (got 'lots')",
        "t.yaml:14: chain[1]: capabilities.environment names variables not in environment: SECRET",
    ]
