"""What the build and training configs share: strict, frozen sections, one error type
(:class:`~pipeline.errors.ConfigError`), and YAML loading whose errors name the file and key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import ConfigError


class Section(BaseModel):
    """A config section: unknown keys and wrong types are errors; values are read-only."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


S = TypeVar("S", bound=BaseModel)


def validate(model: type[S], data: Any, source: str) -> S:
    """``data`` as a ``model``; a :class:`ConfigError` names ``source`` and every bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: invalid config: expected a mapping at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        parts = []
        for e in err.errors():
            loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            parts.append(f"{loc}: {msg.removeprefix('Value error, ')}")
        raise ConfigError(f"{source}: invalid config: " + "; ".join(parts)) from None


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """The YAML document at ``path`` (an empty file is an empty mapping)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{p}: cannot read config: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {str(err).splitlines()[0]}") from None
    return {} if data is None else data
