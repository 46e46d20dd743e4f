"""Commands `shieldproxy config check FILE` and `shieldproxy config schema`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from shieldproxy.config import ConfigError, ShieldConfig, load_config


def check_main(path: Path) -> int:
    """Validate PATH as a daemon configuration and print the result.

    Returns:
        0 when the file is valid, 2 when it is missing or invalid. The errors go
        to stderr, one line per invalid field.
    """
    try:
        config = load_config(path, ShieldConfig)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    names = ", ".join(scope.name for scope in config.scopes)
    count = len(config.scopes)
    noun = "scope" if count == 1 else "scopes"
    print(f"{path}: valid (mode {config.mode}, {count} {noun}: {names})")
    return 0


def schema_main() -> int:
    """Print the JSON schema of the daemon configuration and return 0."""
    print(json.dumps(ShieldConfig.model_json_schema(), indent=2))
    return 0
