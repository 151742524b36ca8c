"""The config's entry points: YAML text or a file in, a validated `SluiceConfig` out.

Every problem is reported as ``file:line: yaml.path: message``, and all of them at once, so a
broken config can be fixed in one pass: the YAML line index (yamlindex.py) gives each path its
line, the models (models.py) validate, and errors.py words each problem.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from .errors import ConfigError, Loc, describe, format_loc, message
from .models import LISTEN_TAGS, SluiceConfig, cross_check
from .yamlindex import line_for, load_yaml

__all__ = ["load_config", "parse_config"]


def parse_config(text: str, source: str = "<string>", base_dir: Path = Path(".")) -> SluiceConfig:
    """Validate YAML text. Relative paths in it resolve against `base_dir`. Raises ConfigError."""
    data, lines, duplicates = load_yaml(text, source)
    found: list[tuple[int, str]] = [
        (line, f"{source}:{line}: {format_loc(path)}: {msg}") for path, line, msg in duplicates
    ]

    def report(loc: Loc, text: str) -> None:
        line = line_for(lines, loc)
        found.append((line, f"{source}:{line}: {format_loc(loc)}: {text}"))

    if data is None:
        data = {}  # an empty file: report the missing keys rather than "not a mapping"
    if not isinstance(data, dict):
        report(
            (), f"the file must be a mapping of keys such as listen, clusters, chain (got {describe(data)})"
        )
        raise ConfigError([msg for _, msg in found])

    config: SluiceConfig | None = None
    try:
        config = SluiceConfig.model_validate(data, context={"base_dir": base_dir, "cross_checked": True})
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            # Errors about a dict key carry a trailing '[key]'; the key's own line is what we want.
            # `listen`'s union adds its branch name: the path is what the file says.
            loc = tuple(part for part in error["loc"] if part != "[key]" and part not in LISTEN_TAGS)
            report(loc, message(error, SluiceConfig))
    for loc, problem in cross_check(data):
        report(loc, problem)

    if found or config is None:
        unique = list(dict.fromkeys(msg for _, msg in sorted(found, key=lambda item: item[0])))
        raise ConfigError(unique)
    config._lines = lines
    config._source_name = source
    return config


def load_config(path: str | Path) -> SluiceConfig:
    """Read and validate a config file; relative paths in it are relative to its directory."""
    source = str(path)
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read config: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text: {exc.reason} at byte {exc.start}"]) from None
    config = parse_config(text, source=source, base_dir=file.resolve().parent)
    config._source_path = file.resolve()
    return config
