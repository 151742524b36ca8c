from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from sluice import BUILTIN_FILTERS_DIR, DEMO_CONFIG, abi
from sluice.proxy.config import (
    ClusterConfig,
    ConfigError,
    FilterConfig,
    HostPort,
    MiB,
    RouteConfig,
    RouteMatch,
    SluiceConfig,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parent.parent

# The example from the issue, verbatim: it must load as written.
ISSUE_YAML = """\
listen: 127.0.0.1:8080
admin:
  listen: 127.0.0.1:9901
filters_dir: filters              # relative to this file; watched for hot reload
clusters:
  web:
    endpoints: ["127.0.0.1:9001", "127.0.0.1:9002"]
  web-canary:
    endpoints: ["127.0.0.1:9003"]
chain:                            # requests pass in this order, responses in reverse
  - name: auth
    module: auth.wasm             # file in filters_dir
    config: {api_keys: ["k1"]}    # handed to on_configure as JSON
    failure_policy: fail_closed   # fail_closed | fail_open | reload
  - name: ratelimit
    module: ratelimit.wasm
    config: {requests_per_second: 50, burst: 10, key: "header:x-api-key"}
routes:                           # first match wins, matched AFTER the request-headers phase of the chain,
  - match: {prefix: /, headers: {x-variant: canary}}   # against the request as the filters left it
    cluster: web-canary
  - match: {prefix: /}
    cluster: web
"""

MINIMAL = """\
listen: 127.0.0.1:8080
clusters:
  web: {endpoints: ["127.0.0.1:9001"]}
routes:
  - {match: {prefix: /}, cluster: web}
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), source="t.yaml")
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def one_error(text: str) -> str:
    errors = errors_of(text)
    assert len(errors) == 1, errors
    return errors[0]


# -- the issue's example and the shipped default -----------------------------------------------------


def test_issue_example_loads_as_written(tmp_path: Path) -> None:
    config = parse_config(ISSUE_YAML, source="sluice.yaml", base_dir=tmp_path)
    assert config.listen == HostPort("127.0.0.1", 8080)
    assert config.admin.listen == HostPort("127.0.0.1", 9901)
    assert config.admin.token is None
    assert config.filters_dir == (tmp_path / "filters").resolve()
    assert [str(e) for e in config.clusters["web"].endpoints] == ["127.0.0.1:9001", "127.0.0.1:9002"]
    assert config.clusters["web-canary"].timeout == 15.0
    assert [f.name for f in config.chain] == ["auth", "ratelimit"]
    auth, ratelimit = config.chain
    assert auth.module_path == config.filters_dir / "auth.wasm"
    assert auth.configuration_bytes() == b'{"api_keys":["k1"]}'
    assert (
        ratelimit.configuration_bytes() == b'{"requests_per_second":50,"burst":10,"key":"header:x-api-key"}'
    )
    assert ratelimit.failure_policy == "fail_closed"
    assert [(r.name, r.cluster) for r in config.routes] == [("route0", "web-canary"), ("route1", "web")]
    assert config.routes[0].match.headers == {"x-variant": "canary"}
    assert config.max_body_buffer == 1 * MiB
    assert config.source_path is None


def test_defaults(tmp_path: Path) -> None:
    config = parse_config("listen: 127.0.0.1:0\n", base_dir=tmp_path)
    assert config.admin.listen == HostPort("127.0.0.1", 9901)
    assert config.filters_dir == (tmp_path / "filters").resolve()
    assert config.cache_dir == (tmp_path / ".sluice-cache").resolve()
    assert (config.clusters, config.chain, config.routes) == ({}, [], [])
    assert config.max_request_header_size == 8192
    assert config.drain_timeout == 30.0
    assert config.access_log == "stdout"
    entry = FilterConfig(name="f", module="f.wasm")
    assert (entry.memory_limit, entry.cpu_deadline_ms, entry.log_level) == (64 * MiB, 20.0, "info")
    cluster = ClusterConfig(endpoints=[HostPort("h", 1)])
    assert (cluster.timeout, cluster.connect_timeout, cluster.max_connections) == (15.0, 2.0, 256)


def test_default_config_file_loads() -> None:
    config = load_config(DEMO_CONFIG)
    assert config.listen == HostPort("127.0.0.1", 8080)
    assert config.admin.listen == HostPort("127.0.0.1", 9901)
    assert config.filters_dir == BUILTIN_FILTERS_DIR
    assert [f.module for f in config.chain] == ["auth.wasm", "ratelimit.wasm", "ab.wasm"]
    assert {name: [str(e) for e in c.endpoints] for name, c in config.clusters.items()} == {
        "web": ["127.0.0.1:9001"],
        "web-canary": ["127.0.0.1:9002"],
    }
    assert [r.cluster for r in config.routes] == ["web-canary", "web"]
    assert config.source_path == DEMO_CONFIG


def test_load_config_resolves_paths_against_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    file = tmp_path / "conf" / "s.yaml"
    file.write_text(
        "listen: 127.0.0.1:0\nfilters_dir: ../wasm\ncache_dir: cache\naccess_log: logs/access.log\n"
        "chain: [{name: f, module: f.wasm}]\n"
    )
    monkeypatch.chdir(tmp_path)
    config = load_config("conf/s.yaml")
    assert config.source_path == file.resolve()
    assert config.filters_dir == (tmp_path / "wasm").resolve()
    assert config.cache_dir == (tmp_path / "conf" / "cache").resolve()
    assert config.access_log == str((tmp_path / "conf" / "logs" / "access.log").resolve())
    assert config.chain[0].module_path == (tmp_path / "wasm" / "f.wasm").resolve()
    assert config.where("chain", 0) == "conf/s.yaml:5: chain[0]"
    assert config.line_of("filters_dir") == 2
    assert config.line_of("nope") is None


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    assert info.value.errors[0].startswith(f"{tmp_path / 'missing.yaml'}: cannot read config")


# -- error reporting ---------------------------------------------------------------------------------


def test_error_names_file_line_and_path() -> None:
    text = ISSUE_YAML.replace("failure_policy: fail_closed", "failure_policy: explode")
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="config/sluice.yaml")
    assert info.value.errors == [
        "config/sluice.yaml:14: chain[0].failure_policy: must be one of fail_closed, fail_open, reload "
        "(got 'explode')"
    ]


def test_unknown_keys_name_the_key_and_its_line() -> None:
    errors = errors_of(
        """\
        listen: 127.0.0.1:8080
        admin:
          listen: 127.0.0.1:9901
          tokn: secret
        colour: blue
        chain:
          - name: a
            module: a.wasm
            modul: b.wasm
        """
    )
    assert errors == [
        "t.yaml:4: admin.tokn: unknown key 'tokn'; did you mean 'token'?",
        "t.yaml:5: colour: unknown key 'colour' (allowed: listen, admin, filters_dir, clusters, chain, "
        "routes, max_body_buffer, max_request_header_size, drain_timeout, access_log, cache_dir, timeouts, "
            "node, traffic_direction, workers, shared_data)",
        "t.yaml:9: chain[0].modul: unknown key 'modul'; did you mean 'module'?",
    ]


def test_missing_keys_point_at_the_enclosing_key() -> None:
    errors = errors_of(
        """\
        admin: {listen: 127.0.0.1:9901}
        clusters:
          web:
            timeout: 3
        """
    )
    assert errors == [
        "t.yaml:1: listen: required key is missing",
        "t.yaml:3: clusters.web.endpoints: required key is missing",
    ]


def test_all_errors_are_collected_and_sorted_by_line() -> None:
    errors = errors_of(
        """\
        listen: nope
        clusters:
          web: {endpoints: []}
        chain:
          - {name: a, module: a.wasm, memory_limit: 64MB}
          - {name: a, module: b.wasm, cpu_deadline_ms: 0}
        routes:
          - {match: {prefix: /, regex: x}, cluster: web}
          - {match: {}, cluster: gone}
        drain_timeout: -1
        """
    )
    assert [e.split(":")[1] for e in errors] == ["1", "3", "5", "6", "6", "8", "9", "10"]
    assert "chain[1].name: duplicate filter name 'a' (also chain[0])" in errors[3] + errors[4]
    assert "chain[1].cpu_deadline_ms: must be greater than 0 (got 0)" in errors[3] + errors[4]
    assert errors[-1] == "t.yaml:10: drain_timeout: must be at least 0 (got -1)"


def test_yaml_syntax_errors_give_the_line() -> None:
    assert one_error("listen: 127.0.0.1:8080\nclusters:\n  web: [1\n").startswith(
        "t.yaml:4: YAML syntax error:"
    )
    assert (
        one_error("listen: a\n  b: c\n") == "t.yaml:2: YAML syntax error: mapping values are not allowed here"
    )
    assert one_error("a: 1\n---\nb: 2\n").startswith(
        "t.yaml:2: YAML syntax error: expected a single document"
    )


def test_top_level_must_be_a_mapping() -> None:
    assert one_error("- listen\n") == (
        "t.yaml:1: (top level): the file must be a mapping of keys such as listen, clusters, chain "
        "(got a list)"
    )
    assert errors_of("") == ["t.yaml:1: listen: required key is missing"]


def test_duplicate_yaml_keys_are_errors() -> None:
    errors = errors_of(
        """\
        listen: 127.0.0.1:8080
        clusters:
          web: {endpoints: ["h:1"]}
          web: {endpoints: ["h:2"]}
        """
    )
    assert errors == ["t.yaml:4: clusters.web: duplicate key 'web' (first given on line 3)"]


def test_wrong_types_read_like_yaml() -> None:
    errors = errors_of(
        """\
        listen: 127.0.0.1:8080
        clusters:
          web: ["127.0.0.1:1"]
        chain: {name: a}
        routes:
          - match: {prefix: /, headers: {x-flag: true}}
            cluster: web
        """
    )
    assert errors == [
        "t.yaml:3: clusters.web: must be a mapping (got a list)",
        "t.yaml:4: chain: must be a list (got a mapping)",
        "t.yaml:6: routes[0].match.headers.x-flag: must be a string (got true); "
        "put it in quotes if it is meant as text",
    ]


def test_yaml_1_1_booleans_and_dates_stay_text() -> None:
    config = parse_config(
        """\
listen: 127.0.0.1:8080
clusters: {web: {endpoints: ["h:1"]}}
chain: [{name: a, module: a.wasm, config: {enabled: true, mode: on, since: 2024-01-01, n: 2}}]
routes: [{match: {headers: {x-beta: yes, x-version: 2}}, cluster: web}]
"""
    )
    assert config.routes[0].match.headers == {"x-beta": "yes", "x-version": "2"}
    assert config.chain[0].configuration_bytes() == b'{"enabled":true,"mode":"on","since":"2024-01-01","n":2}'


# -- addresses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port", "canonical"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080, "127.0.0.1:8080"),
        ("[::1]:8080", "::1", 8080, "[::1]:8080"),
        ("[::]:0", "::", 0, "[::]:0"),
        ("localhost:80", "localhost", 80, "localhost:80"),
        ("web_1.internal:9000", "web_1.internal", 9000, "web_1.internal:9000"),
        (" 10.0.0.1:1 ", "10.0.0.1", 1, "10.0.0.1:1"),
    ],
)
def test_hostport_parse(text: str, host: str, port: int, canonical: str) -> None:
    hp = HostPort.parse(text)
    assert (hp.host, hp.port, str(hp)) == (host, port, canonical)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("::1:8080", "an IPv6 address needs brackets"),
        ("[::1]8080", "expected [ipv6]:port"),
        ("[::1:8080", "missing ']'"),
        ("[example.com]:80", "not an IPv6 address"),
        ("127.0.0.1", "expected host:port"),
        (":8080", "missing host"),
        ("h:http", "port must be a number"),
        ("h:65536", "at most 65535"),
        ("bad host:1", "invalid host"),
    ],
)
def test_hostport_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        HostPort.parse(text)


def test_ipv6_in_config() -> None:
    config = parse_config(
        'listen: "[::1]:8080"\nadmin: {listen: "[::1]:9901"}\nclusters: {v6: {endpoints: ["[fd00::2]:80"]}}\n'
    )
    assert config.listen == HostPort("::1", 8080)
    assert config.admin.listen.is_loopback
    assert str(config.clusters["v6"].endpoints[0]) == "[fd00::2]:80"
    # Unquoted, YAML reads `[::1]:8080` as a flow sequence: the message must still be clear.
    assert one_error("listen: [::1]:8080\n").endswith('an IPv6 address must be quoted, e.g. "[::1]:8080"')
    assert one_error("listen: [1]\n") == (
        "t.yaml:1: listen: must be host:port as a string, e.g. 127.0.0.1:8080 (got a list)"
    )
    assert one_error('listen: "::1:8080"\n') == (
        "t.yaml:1: listen: an IPv6 address needs brackets, e.g. [::1]:8080 (got '::1:8080')"
    )


def test_endpoint_port_zero_is_rejected() -> None:
    assert one_error('listen: 127.0.0.1:0\nclusters: {web: {endpoints: ["h:0"]}}\n') == (
        "t.yaml:2: clusters.web.endpoints: endpoint h:0 has port 0"
    )


def test_admin_token_required_off_loopback() -> None:
    assert one_error("listen: 127.0.0.1:8080\nadmin:\n  listen: 0.0.0.0:9901\n") == (
        "t.yaml:2: admin: token is required when listen (0.0.0.0:9901) is not a loopback address"
    )
    assert "not a loopback" in one_error("listen: 127.0.0.1:8080\nadmin: {listen: 'admin.internal:9901'}\n")
    config = parse_config("listen: 127.0.0.1:8080\nadmin: {listen: 0.0.0.0:9901, token: s3cret}\n")
    assert config.admin.token == "s3cret"
    assert parse_config("listen: 127.0.0.1:8080\nadmin: {listen: localhost:9901}\n").admin.token is None


def test_admin_and_listen_must_differ() -> None:
    assert one_error("listen: 127.0.0.1:8080\nadmin: {listen: 127.0.0.1:8080}\n") == (
        "t.yaml:2: admin.listen: same address as listen (127.0.0.1:8080)"
    )


# -- sizes and timeouts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1024", 1024), ('"64MiB"', 64 * MiB), ('"512KiB"', 512 * 1024), ('"1GiB"', 1 << 30), ('"8 kib"', 8192)],
)
def test_sizes(value: str, expected: int) -> None:
    config = parse_config(f"listen: 127.0.0.1:1\nmax_body_buffer: {value}\n")
    assert config.max_body_buffer == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"64MB"', "unknown size unit 'MB' in '64MB' (use B, KiB, MiB or GiB)"),
        (
            "lots",
            'must be a size in bytes: a whole number or a string like "64MiB", "512KiB", "1GiB" '
            "(got 'lots')",
        ),
        ("true", "must be a size in bytes"),
        ("1.5", "must be a size in bytes"),
        ("0", "must be greater than 0 (got 0)"),
        ("-5", "must be greater than 0 (got -5)"),
    ],
)
def test_bad_sizes(value: str, message: str) -> None:
    error = one_error(
        f"listen: 127.0.0.1:1\nchain:\n  - name: f\n    module: f.wasm\n    memory_limit: {value}\n"
    )
    assert error.startswith("t.yaml:5: chain[0].memory_limit: ")
    assert message in error


@pytest.mark.parametrize("key", ["timeout", "connect_timeout"])
@pytest.mark.parametrize("value", ["0", "-1", ".nan", ".inf", "true", "soon"])
def test_timeouts_must_be_positive(key: str, value: str) -> None:
    error = one_error(f"listen: 127.0.0.1:1\nclusters:\n  web:\n    endpoints: [h:1]\n    {key}: {value}\n")
    assert error.startswith(f"t.yaml:5: clusters.web.{key}: ")


# -- filters -----------------------------------------------------------------------------------------


def test_configuration_bytes() -> None:
    assert FilterConfig(name="f", module="f.wasm").configuration_bytes() == b""
    assert (
        FilterConfig(name="f", module="f.wasm", config="raw text ü").configuration_bytes()
        == "raw text ü".encode()
    )
    assert (
        FilterConfig(name="f", module="f.wasm", config=[1, "ü"]).configuration_bytes() == '[1,"ü"]'.encode()
    )
    assert FilterConfig(name="f", module="f.wasm", config=0).configuration_bytes() == b"0"
    entry = FilterConfig(name="f", module="f.wasm", vm_config={"a": {"b": None}})
    assert entry.vm_configuration_bytes() == b'{"a":{"b":null}}'


def test_config_must_be_json() -> None:
    error = one_error("listen: 127.0.0.1:1\nchain:\n  - name: f\n    module: f.wasm\n    config: {x: .nan}\n")
    assert error.startswith("t.yaml:5: chain[0].config: cannot be handed to the filter as JSON")


def test_to_plugin_spec(tmp_path: Path) -> None:
    config = parse_config(
        """\
listen: 127.0.0.1:1
filters_dir: wasm
chain:
  - name: rl
    module: ratelimit.wasm
    config: {burst: 10}
    failure_policy: reload
    memory_limit: 16MiB
    cpu_deadline_ms: 5
    log_level: WARNING
    environment: {MODE: fast, LEVEL: 3}
    vm_config: boot
  - name: other
    module: sub/x.wasm
    vm_id: shared
    root_id: r
""",
        base_dir=tmp_path,
    )
    spec = config.chain[0].to_plugin_spec()
    assert spec == abi.PluginSpec(
        name="rl",
        module_path=(tmp_path / "wasm" / "ratelimit.wasm").resolve(),
        configuration=b'{"burst":10}',
        vm_configuration=b"boot",
        vm_id="rl",
        root_id="",
        failure_policy=abi.FailurePolicy.RELOAD,
        memory_limit=16 * MiB,
        cpu_deadline_ms=5.0,
        environment={"MODE": "fast", "LEVEL": "3"},
        log_level=abi.LogLevel.WARN,
    )
    other = config.chain[1].to_plugin_spec()
    assert (other.vm_id, other.root_id, other.failure_policy) == (
        "shared",
        "r",
        abi.FailurePolicy.FAIL_CLOSED,
    )
    assert other.module_path == (tmp_path / "wasm" / "sub" / "x.wasm").resolve()
    assert FilterConfig(name="solo", module="/abs/solo.wasm").to_plugin_spec().module_path == Path(
        "/abs/solo.wasm"
    )


def test_filter_field_checks() -> None:
    errors = errors_of(
        """\
        listen: 127.0.0.1:1
        chain:
          - name: "bad name"
            module: ""
            log_level: loud
            match: api
            environment: {"A=B": x}
        """
    )
    assert errors == [
        "t.yaml:3: chain[0].name: invalid name 'bad name': use letters, digits, '.', '_' and '-', "
        "starting with a letter or digit",
        "t.yaml:4: chain[0].module: must not be empty",
        "t.yaml:5: chain[0].log_level: unknown log level 'loud' "
        "(one of: trace, debug, info, warn, error, critical)",
        "t.yaml:6: chain[0].match: must be a path prefix starting with '/' (got 'api')",
        "t.yaml:7: chain[0].environment: invalid environment variable name 'A=B'",
    ]


# -- routes ------------------------------------------------------------------------------------------


def test_route_errors() -> None:
    errors = errors_of(
        """\
        listen: 127.0.0.1:1
        clusters: {web: {endpoints: ["h:1"]}}
        routes:
          - match: {prefix: /a, path: /b}
            cluster: web
          - match: {regex: "(unclosed"}
            cluster: web
          - match: {path: relative}
            cluster: web
          - match: {prefix: /, methods: ["GET POST"], headers: {"X-A": "1", "x-a": "2"}}
            cluster: web
          - match: {prefix: /}
            cluster: api
          - cluster: web
        """
    )
    assert errors == [
        "t.yaml:4: routes[0].match: give at most one of prefix, path, regex (got prefix and path)",
        "t.yaml:6: routes[1].match.regex: invalid regular expression '(unclosed': "
        "missing ), unterminated subpattern at position 0",
        "t.yaml:8: routes[2].match.path: must start with '/' (got 'relative')",
        "t.yaml:10: routes[3].match.headers: header 'x-a' is listed twice (names are case-insensitive)",
        "t.yaml:10: routes[3].match.methods: invalid method 'GET POST'",
        "t.yaml:13: routes[4].cluster: unknown cluster 'api' (clusters: web)",
        "t.yaml:14: routes[5].match: required key is missing",
    ]


def test_route_without_clusters() -> None:
    assert one_error("listen: 127.0.0.1:1\nroutes: [{match: {}, cluster: web}]\n") == (
        "t.yaml:2: routes[0].cluster: unknown cluster 'web' (clusters: none are defined)"
    )


def test_route_names() -> None:
    config = parse_config(MINIMAL + "  - {match: {path: /x}, cluster: web, name: exact}\n")
    assert [r.name for r in config.routes] == ["route0", "exact"]
    assert "duplicate route name 'x' (also routes[0])" in one_error(
        MINIMAL.replace("cluster: web}", "cluster: web, name: x}")
        + "  - {match: {}, cluster: web, name: x}\n"
    )


def test_route_match_normalisation() -> None:
    match = RouteMatch(
        headers={"X-Variant": "canary", ":authority": "example.com"}, methods=["get", "POST", "GET"]
    )
    assert match.headers == {"x-variant": "canary", ":authority": "example.com"}
    assert match.methods == ["GET", "POST"]


def test_cross_checks_apply_when_built_in_python() -> None:
    with pytest.raises(ValidationError, match=r"routes\[0\].cluster: unknown cluster 'nope'"):
        SluiceConfig(
            listen=HostPort("127.0.0.1", 1), routes=[RouteConfig(match=RouteMatch(), cluster="nope")]
        )
    config = SluiceConfig(
        listen=HostPort("127.0.0.1", 1),
        clusters={"web": ClusterConfig(endpoints=[HostPort("h", 1)])},
        routes=[RouteConfig(match=RouteMatch(), cluster="web")],
    )
    assert config.routes[0].name == "route0"


def test_counts_are_whole_positive_numbers() -> None:
    for value, message in [("true", "must be a number (got true)"), ("0", "must be greater than 0 (got 0)")]:
        error = one_error(
            f"listen: 127.0.0.1:1\nclusters:\n  web:\n    endpoints: [h:1]\n    max_connections: {value}\n"
        )
        assert error == f"t.yaml:5: clusters.web.max_connections: {message}"


def test_yaml_merge_keys_work() -> None:
    config = parse_config(
        """\
listen: 127.0.0.1:1
clusters:
  a: &base {endpoints: ["h:1"], timeout: 3}
  b:
    <<: *base
    connect_timeout: 1
"""
    )
    assert (config.clusters["b"].timeout, config.clusters["b"].connect_timeout) == (3.0, 1.0)


# -- node, traffic_direction, strict_imports (issue 14) -------------------------------------------------


def test_node_and_traffic_direction_reach_the_plugin_spec() -> None:
    config = parse_config(textwrap.dedent("""\
        listen: 127.0.0.1:8080
        node:
          id: sidecar~1
          cluster: reviews
          metadata: {WORKLOAD_NAME: reviews-v1, LABELS: {app: reviews}, replicas: 2}
        traffic_direction: outbound
        chain:
          - {name: f, module: f.wasm, strict_imports: true}
        """))
    spec = config.plugin_spec(config.chain[0])
    assert spec.node == abi.NodeInfo("sidecar~1", "reviews", {"WORKLOAD_NAME": "reviews-v1",
                                                              "LABELS": {"app": "reviews"}, "replicas": 2})
    assert spec.listener_direction == 2
    assert spec.strict_imports is True
    plain = parse_config("listen: 127.0.0.1:8080\nchain: [{name: f, module: f.wasm}]\n")
    spec = plain.plugin_spec(plain.chain[0])
    assert spec.node == abi.NodeInfo() and spec.listener_direction == 0 and spec.strict_imports is False


def test_bad_node_and_traffic_direction() -> None:
    assert "traffic_direction" in one_error("listen: 127.0.0.1:8080\ntraffic_direction: sideways\n")
    error = one_error("listen: 127.0.0.1:8080\nnode: {metadata: {ratio: .nan}}\n")
    assert "t.yaml:2: node.metadata" in error and "JSON values only" in error
    assert "node.colour" in one_error("listen: 127.0.0.1:8080\nnode: {colour: red}\n")


def test_a_list_of_listeners_with_several_workers_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        "listen:\n  - address: 127.0.0.1:8080\nworkers: 2\nclusters:\n  web: {endpoints: [\"127.0.0.1:9001\"]}\n"
        "routes:\n  - {match: {prefix: /}, cluster: web}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [
        f"{path}:3: workers: more than one worker needs `listen` as one address (a list of listeners runs with "
        "workers: 1)"
    ]
