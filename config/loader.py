"""Finding, reading and validating the one configuration file.

``MQI_CONFIG_PATH`` wins; otherwise the bundled ``config.default.yaml``. The
file is validated whole: every problem is collected and reported together,
each at its key path (``hosts.gpu.port``, ``workflows.default_qa[1]``), with the
file's name, and never as a traceback.
"""

from __future__ import annotations

import difflib
import functools
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from config.errors import MqiError
from config.models import MqiConfig, cross_section_issues, secret_hint

ENV_VAR = "MQI_CONFIG_PATH"
CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_PATH = CONFIG_DIR / "config.default.yaml"
DEMO_PATH = CONFIG_DIR / "demo.yaml"


class ConfigError(MqiError):
    """The configuration file is missing, unreadable or invalid.

    Attributes:
        path: The file concerned.
        issues: (key path, message) pairs; the key path is "" for whole-file problems.
    """

    exit_status = 2

    def __init__(self, path: Path | str, issues: list[tuple[str, str]]) -> None:
        self.path = Path(path)
        self.issues = issues
        lines = [f"invalid configuration in {self.path}:"]
        lines += [f"  {key}: {msg}" if key else f"  {msg}" for key, msg in issues]
        super().__init__("\n".join(lines))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last one silently."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode,
                                deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark)
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _mapping_without_duplicates)


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The file to load: ``path`` if given, else ``$MQI_CONFIG_PATH``, else the default."""
    if path is not None:
        return Path(path)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_PATH


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and Optional[...] down to the type that holds values."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0] if len(args) == 1 else annotation
            if len(args) != 1:
                return annotation
        else:
            return annotation


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section that holds the unknown key at ``loc`` (for suggestions)."""
    annotation: Any = MqiConfig
    for part in loc[:-1]:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return []
            annotation = field.annotation
        elif typing.get_origin(annotation) in (dict, list):
            annotation = typing.get_args(annotation)[-1]
        else:
            return []
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _describe(error: ErrorDetails) -> str:
    kind = error["type"]
    loc = error["loc"]
    if kind == "missing":
        return "required section is missing" if len(loc) == 1 else "required key is missing"
    if kind == "extra_forbidden":
        key = loc[-1]
        close = difflib.get_close_matches(str(key), _allowed_keys(loc), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key{hint}{secret_hint(key)}"
    message = error["msg"]
    value = error.get("input")
    if isinstance(value, str | int | float | bool) or value is None:
        message += f" (got {value!r})"
    return message


def parse_config(data: Any, path: Path) -> MqiConfig:
    """Validate already-parsed YAML data as the configuration from ``path``.

    Raises:
        ConfigError: Every problem found, each at its key path.
    """
    if data is None:
        raise ConfigError(path, [("", "the file is empty")])
    if not isinstance(data, dict):
        raise ConfigError(path, [("", "the top level must be a mapping of sections")])
    try:
        cfg = MqiConfig.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as exc:
        raise ConfigError(path, [(_key_path(e["loc"]), _describe(e))
                                 for e in exc.errors()]) from None
    issues = cross_section_issues(cfg)
    if issues:
        raise ConfigError(path, issues)
    return cfg


def load_config(path: str | os.PathLike[str] | None = None) -> MqiConfig:
    """Read and validate a configuration file (uncached; see ``get_config``).

    Args:
        path: The file; defaults to ``$MQI_CONFIG_PATH`` or the bundled default.

    Raises:
        ConfigError: The file is missing, not YAML, or not a valid configuration.
    """
    resolved = config_path(path)
    source = f" (from ${ENV_VAR})" if path is None and os.environ.get(ENV_VAR) else ""
    try:
        text = resolved.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(resolved, [("", f"file not found{source}")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(resolved, [("", f"cannot read the file{source}: {exc}")]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(resolved, [("", f"not valid YAML: {where}{problem}")]) from None
    return parse_config(data, resolved)


@functools.lru_cache(maxsize=4)
def _cached(path: Path) -> MqiConfig:
    return load_config(path)


def get_config(path: str | os.PathLike[str] | None = None) -> MqiConfig:
    """The configuration, loaded once per process and file (``get_config.cache_clear()``
    forgets it)."""
    return _cached(config_path(path).resolve())


get_config.cache_clear = _cached.cache_clear  # type: ignore[attr-defined]
