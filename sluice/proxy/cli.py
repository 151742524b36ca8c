"""The `sluice` command (also `python -m sluice.proxy`).

    sluice run   [-c FILE]        serve with a config (default: the shipped demo config)
    sluice check [-c FILE]        validate a config and load every filter, without serving
    sluice config-path            print where the shipped demo config is (to copy and edit)
    sluice filter test MODULE.wasm [options]   run one filter against one made-up request

Exit status: 0 success, 1 invalid config or a filter that does not load, 2 bad command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from sluice import DEMO_CONFIG
from sluice.proxy.config import ConfigError, HostPort, SluiceConfig, load_config, resolve_workers

__all__ = ["DEFAULT_CONFIG", "build_parser", "main"]

DEFAULT_CONFIG = str(DEMO_CONFIG)
"""The shipped demo config (package data): `sluice run` with no `-c` serves the demo."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse exits on --help and on usage errors; callers of main() get the status instead.
        return exc.code if isinstance(exc.code, int) else 2
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_usage(sys.stderr)
        return 2
    return handler(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice", description="An edge/sidecar reverse proxy running proxy-wasm filters."
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = commands.add_parser("run", help="serve with a config file")
    _config_option(run)
    run.set_defaults(handler=_run)

    check = commands.add_parser("check", help="validate a config and load its filters without serving")
    _config_option(check)
    check.set_defaults(handler=_check)

    where = commands.add_parser("config-path", help="print the path of the shipped demo config")
    where.set_defaults(handler=_config_path)

    filter_cmd = commands.add_parser("filter", help="work with a single filter module")
    filter_cmds = filter_cmd.add_subparsers(title="filter commands", metavar="COMMAND")
    test = filter_cmds.add_parser(
        "test",
        help="run one filter against one request and a canned upstream response",
        description="Load MODULE.wasm, pass it one request and one upstream response, and show "
        "what it did to each (headers, bodies, local replies, logs, callouts).",
    )
    test.add_argument("module", metavar="MODULE.wasm", help="the filter module")
    test.add_argument("--config", metavar="JSON", help="plugin configuration handed to on_configure")
    test.add_argument("--method", default="GET", help="request method (default GET)")
    test.add_argument("--path", default="/", help="request path with query (default /)")
    test.add_argument(
        "-H",
        "--header",
        dest="header",
        metavar="'NAME: VALUE'",
        type=_header,
        action="append",
        default=[],
        help="request header; repeatable",
    )
    test.add_argument("--body", help="request body")
    test.add_argument(
        "--response-status", type=int, default=200, metavar="N", help="upstream status (default 200)"
    )
    test.add_argument(
        "--response-header",
        dest="response_header",
        metavar="'NAME: VALUE'",
        type=_header,
        action="append",
        default=[],
        help="upstream response header; repeatable",
    )
    test.add_argument("--response-body", help="upstream response body")
    test.add_argument(
        "--upstream",
        dest="upstream",
        metavar="NAME=HOST:PORT",
        type=_upstream,
        action="append",
        default=[],
        help="a cluster the filter may call out to; repeatable",
    )
    test.set_defaults(handler=_filter_test)
    # `sluice filter` alone: say what is missing instead of doing nothing.
    filter_cmd.set_defaults(handler=lambda _args: _usage(filter_cmd))
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help=f"config file (default {DEFAULT_CONFIG})",
    )


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_usage(sys.stderr)
    return 2


# `filter test` options are checked here, so mistakes get argparse's usage message, but passed on
# as written: sluice.proxy.filtertest parses them itself.


def _header(text: str) -> str:
    name, sep, _value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'NAME: VALUE', got {text!r}")
    return text


def _upstream(text: str) -> str:
    name, sep, address = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT, got {text!r}")
    try:
        HostPort.parse(address)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return text


def _load(path: str) -> SluiceConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


# -- run -------------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    # Imported here so that `check` and `filter test` do not pull in the HTTP server.
    if resolve_workers(config.workers) > 1:
        from sluice.proxy.fleet import serve_fleet

        return serve_fleet(config)
    from sluice.proxy.app import serve

    return serve(config)


# -- check -----------------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    from sluice.proxy.checking import check_filters

    config = _load(args.config)
    if config is None:
        return 1
    result = check_filters(config)
    for problem in result.problems:
        print(problem, file=sys.stderr)
    if result.problems:
        print(f"{args.config}: {len(result.problems)} of {len(config.chain)} filters failed to load", file=sys.stderr)
        return 1
    counts = f"{len(config.chain)} filters, {len(config.routes)} routes, {len(config.clusters)} clusters"
    print(f"config OK: {counts}")
    return 0


# -- config-path -----------------------------------------------------------------------------------


def _config_path(_args: argparse.Namespace) -> int:
    print(DEMO_CONFIG)
    return 0


# -- filter test -----------------------------------------------------------------------------------


def _filter_test(args: argparse.Namespace) -> int:
    from sluice.proxy.filtertest import main as filter_test_main

    return filter_test_main(args)
