"""sluice's configuration: YAML in, a validated `SluiceConfig` out (contract: docs/config-model.md).

One concern per module:

* `values`    - value types (`HostPort`, sizes, durations, names, filter payloads);
* `models`    - the sections of the file as pydantic models, and the cross-field checks;
* `yamlindex` - the line-tracking YAML loader: the line of every key and list item, by path;
* `errors`    - `ConfigError` and the prose of every message (``file:line: path: message``);
* `load`      - `parse_config` / `load_config`, which put the four together.

Everything the rest of sluice uses is importable from here.
"""

from .errors import ConfigError
from .load import load_config, parse_config
from .models import (
    AdminConfig,
    ClusterConfig,
    FilterConfig,
    RouteConfig,
    RouteMatch,
    SharedDataBackend,
    SharedDataConfig,
    SluiceConfig,
    TimeoutsConfig,
)
from .values import GiB, HostPort, KiB, MiB, Workers, format_host_port, resolve_workers

__all__ = [
    "AdminConfig",
    "ClusterConfig",
    "ConfigError",
    "FilterConfig",
    "GiB",
    "HostPort",
    "KiB",
    "MiB",
    "RouteConfig",
    "RouteMatch",
    "SharedDataBackend",
    "SharedDataConfig",
    "SluiceConfig",
    "Workers",
    "TimeoutsConfig",
    "format_host_port",
    "load_config",
    "parse_config",
    "resolve_workers",
]
