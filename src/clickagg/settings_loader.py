"""Fill ``Settings`` from CLI flags, ``CLICKAGG_*`` environment variables and a TOML file.

Precedence: flag > environment variable > TOML file > the default of the ``Settings``
field (the only place defaults are written). A setting's name is its field's name
without the ``_ms`` of durations: ``allowed_lateness_ms`` is ``allowed_lateness`` in the
file, ``CLICKAGG_ALLOWED_LATENESS`` in the environment. Durations are written "30s",
"5m", "1h" (a bare number is seconds); sizes are bytes or "64MiB", "50GiB".

Unknown keys, unknown ``CLICKAGG_*`` variables and unparseable values raise
``SettingsError``, whose message names the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from clickagg.config import Settings, parse_duration_ms

ENV_PREFIX = "CLICKAGG_"
CONFIG_ENV = "CLICKAGG_CONFIG"
# The benchmark scripts' own variables; they reach ``clickagg serve`` but are not settings.
IGNORED_ENV_PREFIXES = ("CLICKAGG_BENCH_",)
# The settings that have a ``clickagg serve`` flag; the others are set by env or file.
FLAGS = {
    "data_dir": "--data-dir",
    "host": "--host",
    "port": "--port",
    "partitions": "--partitions",
    "allowed_lateness": "--allowed-lateness",
    "dedup_horizon": "--dedup-horizon",
    "ads_file": "--ads",
    "advertisers_file": "--advertisers",
    "log_level": "--log-level",
}
# Settings whose value is one of a few words (uvicorn's and logging's level names).
# Settings whose value is a secret: --print-config shows whether it is set, not the value.
SECRETS = {"admin_token"}
CHOICES = {"log_level": ("critical", "error", "warning", "info", "debug")}

_T = TypeVar("_T")
Kind = Literal["duration", "size", "int", "bool", "str", "path", "optional_path"]


class SettingsError(ValueError):
    """A setting could not be read; the message names the key and where it came from."""


@dataclass(frozen=True)
class Spec:
    """One setting: its name (the TOML key), the ``Settings`` field and how to parse it."""

    name: str
    field: str
    kind: Kind
    default: object

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str | None:
        return FLAGS.get(self.name)


def _spec(field: dataclasses.Field[object], hint: object) -> Spec:
    kind: Kind
    if hint is int and field.name.endswith("_ms"):
        kind = "duration"
    elif hint is int and field.name.endswith("_bytes"):
        kind = "size"
    elif hint is bool:
        kind = "bool"
    elif hint is int:
        kind = "int"
    elif hint is str:
        kind = "str"
    elif hint is Path:
        kind = "path"
    elif hint == Path | None:
        kind = "optional_path"
    else:
        raise TypeError(f"Settings.{field.name}: no loader for {hint!r}")
    if field.default is dataclasses.MISSING:
        raise TypeError(f"Settings.{field.name} needs a default")
    name = field.name.removesuffix("_ms") if kind == "duration" else field.name
    return Spec(name=name, field=field.name, kind=kind, default=field.default)


_HINTS = typing.get_type_hints(Settings)
SPECS: dict[str, Spec] = {
    spec.name: spec
    for spec in (_spec(f, _HINTS[f.name]) for f in dataclasses.fields(Settings) if f.init)
}

_SIZE = re.compile(r"^\s*(\d[\d_]*)\s*(B|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}
_DURATION_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000))
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_size(text: str) -> int:
    """Parse bytes: "1048576", "64MiB", "50GiB"."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (use bytes or e.g. 64MiB, 50GiB)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"]


def parse_value(spec: Spec, raw: object) -> object:
    """A setting's value from a string (flag, environment) or a TOML value."""
    if isinstance(raw, str):
        return _parse_text(spec, raw)
    if spec.kind in ("duration", "size", "int") and type(raw) is int:
        if raw < 0:
            raise ValueError(f"must not be negative: {raw}")
        return raw * 1000 if spec.kind == "duration" else raw  # a bare duration is seconds
    if spec.kind == "bool" and isinstance(raw, bool):
        return raw
    raise ValueError(f"expected {_EXPECTED[spec.kind]}, got {raw!r}")


_EXPECTED: dict[Kind, str] = {
    "duration": 'a duration such as "30s" or "5m"',
    "size": 'bytes or a size such as "64MiB"',
    "int": "an integer",
    "bool": "true or false",
    "str": "a string",
    "path": "a path",
    "optional_path": 'a path (or "" for none)',
}


def _parse_text(spec: Spec, text: str) -> object:
    if spec.kind == "duration":
        return parse_duration_ms(text)
    if spec.kind == "size":
        return parse_size(text)
    if spec.kind == "int":
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"not an integer: {text!r}") from None
        if value < 0:
            raise ValueError(f"must not be negative: {value}")
        return value
    if spec.kind == "bool":
        if text.strip().lower() not in _BOOLS:
            raise ValueError(f"not true or false: {text!r}")
        return _BOOLS[text.strip().lower()]
    if spec.kind == "path":
        if not text:
            raise ValueError("must not be empty")
        return Path(text)
    if spec.kind == "optional_path":
        return Path(text) if text else None
    choices = CHOICES.get(spec.name)
    if choices is not None:
        if text.lower() not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text.lower()
    return text


def display_value(spec: Spec, value: object) -> str:
    """A value the way settings are written: "5m", "64MiB", "100_000", "none"."""
    if value is None:
        return "none"
    if spec.kind == "duration":
        assert isinstance(value, int)
        for unit, ms in _DURATION_UNITS:
            if value and value % ms == 0:
                return f"{value // ms}{unit}"
        return f"{value}ms"
    if spec.kind == "size":
        assert isinstance(value, int)
        for unit in ("TiB", "GiB", "MiB", "KiB"):
            if value and value % _SIZE_UNITS[unit] == 0:
                return f"{value // _SIZE_UNITS[unit]}{unit}"
        return str(value)
    if spec.kind == "int":
        assert isinstance(value, int)
        return f"{value:_}" if value >= 10_000 else str(value)
    if spec.kind == "bool":
        return "true" if value else "false"
    return str(value)


def toml_value(spec: Spec, value: object) -> str:
    """A value as a TOML literal that this module reads back to the same value."""
    if value is None:
        return '""'
    if spec.kind in ("int", "bool"):
        return display_value(spec, value)
    return json.dumps(display_value(spec, value))


def _shown(spec: Spec, value: object) -> str:
    if spec.name in SECRETS and value:
        return '"(set, not shown)"'
    return toml_value(spec, value)


@dataclass(frozen=True)
class Loaded:
    settings: Settings
    # setting name -> "default", "file <path>", "env <VAR>" or "flag <--flag>"
    sources: Mapping[str, str]

    def to_toml(self) -> str:
        """The effective settings as a TOML file, each line saying where its value came from."""
        lines = [
            (f"{name} = {_shown(spec, getattr(self.settings, spec.field))}", self.sources[name])
            for name, spec in SPECS.items()
        ]
        width = max(len(line) for line, _ in lines)
        return "".join(f"{line:<{width}}  # {source}\n" for line, source in lines)


def load_settings(
    *,
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Loaded:
    """Resolve every setting. ``flags`` maps setting names to parsed values (None: not
    given); ``config_file`` (or else ``$CLICKAGG_CONFIG``) is the TOML file, if any."""
    environ = {} if environ is None else environ
    values: dict[str, object] = {}
    sources = dict.fromkeys(SPECS, "default")

    if config_file is None and environ.get(CONFIG_ENV):
        config_file = Path(environ[CONFIG_ENV])
        if not config_file.is_file():
            raise SettingsError(f"{CONFIG_ENV}: no such file: {config_file}")
    if config_file is not None:
        origin = f"file {config_file}"
        for key, raw in _read_toml(config_file).items():
            spec = _known(key, f"{config_file}: unknown key {key!r}", SPECS)
            values[key] = _parse(spec, raw, f"{config_file}: {key}")
            sources[key] = origin

    by_env = {spec.env: spec for spec in SPECS.values()}
    for var, text in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV:
            continue
        if var.startswith(IGNORED_ENV_PREFIXES):
            continue
        spec = _known(var, f"environment variable {var}: unknown setting", by_env)
        values[spec.name] = _parse(spec, text, f"environment variable {var}")
        sources[spec.name] = f"env {var}"

    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = value
            sources[name] = f"flag {SPECS[name].flag}"

    try:
        fields: dict[str, Any] = {SPECS[name].field: value for name, value in values.items()}
        settings = Settings(**fields)
    except ValueError as exc:
        given = ", ".join(
            f"{name} = {display_value(SPECS[name], value)} ({sources[name]})"
            for name, value in values.items()
        )
        raise SettingsError(f"{exc} [{given}]" if given else str(exc)) from None
    return Loaded(settings=settings, sources=sources)


def _read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None


def _known(key: str, message: str, known: Mapping[str, _T]) -> _T:
    if key in known:
        return known[key]
    close = difflib.get_close_matches(key, list(known), n=1)
    raise SettingsError(message + (f" (did you mean {close[0]}?)" if close else ""))


def _parse(spec: Spec, raw: object, where: str) -> object:
    try:
        return parse_value(spec, raw)
    except ValueError as exc:
        raise SettingsError(f"{where}: {exc}") from None
