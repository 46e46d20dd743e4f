"""YAML configuration files, validated with pydantic.

Every model rejects unknown keys, so a misspelt key fails at startup instead of
being ignored. :func:`load_config` reports the file, the field path and the
reason for every invalid field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """Error for a configuration file that is missing, not YAML, or invalid."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoConfig(StrictModel):
    """Settings of ``shieldproxy demo``."""

    freeze_s: float = Field(
        20.0, gt=0, le=3600, description="Seconds the connection stays checkpointed."
    )
    ip_version: Literal[4, 6] = Field(4, description="IP version of the flow.")
    rate_bytes_per_s: int = Field(
        4 * 1024 * 1024,
        gt=0,
        le=1024**3,
        description="Rate at which the peer sends, in bytes per second.",
    )
    warmup_s: float = Field(
        2.0, ge=0.5, le=60, description="Seconds of streaming before the checkpoint."
    )
    after_s: float = Field(
        3.0, ge=0, le=60, description="Seconds the peer keeps sending after restore."
    )
    receiver_rcvbuf_bytes: int = Field(
        8 * 1024 * 1024,
        ge=64 * 1024,
        le=256 * 1024 * 1024,
        description="SO_RCVBUF of the receiver; it sets the window the shield holds.",
    )
    baseline: bool = Field(
        True, description="Also run the scenario without the shield, for comparison."
    )


ModelT = TypeVar("ModelT", bound=BaseModel)


def load_config(path: Path, model: type[ModelT]) -> ModelT:
    """Read PATH as YAML and validate it against MODEL.

    Raises:
        ConfigError: the file cannot be read, is not a YAML mapping, or has
            invalid fields; the message names the file and each field path.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must be a mapping of settings, "
            f"not a {type(data).__name__}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(path, exc)) from None


def format_errors(path: Path, error: ValidationError) -> str:
    """Return one line per invalid field: ``FILE: field.path: reason``."""
    lines = [f"invalid config file {path}:"]
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {location}: {item['msg']}")
    return "\n".join(lines)
