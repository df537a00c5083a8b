"""Reading rules: the rules file, the files it names, the crawler list; change records.

The one module of :mod:`clickagg.core.rules` that touches files (the worker and the
command line call it; the rules themselves stay pure). A rules file is TOML::

    include_builtin = true          # optional: the built-in rules first (default false)

    [[rules]]
    id = "datacenter-ip"            # named in every reason the rule writes
    kind = "ip_blocklist"           # a registered kind (clickagg.core.rules.registry)
    reason = "data-centre IP"
    enabled = true                  # optional, default true
    effective_from = 2025-01-15T10:00:00Z   # optional: events of this event time on
    [[rules.params.lists]]
    name = "aws"
    file = "ip-ranges.json"         # relative to the rules file
    format = "aws"                  # cidr (default) | aws | google | azure
    [[rules.params.lists]]
    name = "abuse"
    cidrs = ["203.0.113.0/24", "2001:db8:bad::/48"]

What is resolved here, before the pure kinds see the parameters: a ``declared_crawler``
rule with ``source = "crawler-user-agents"`` gets that package's patterns (plus any
``patterns`` of its own); an ``ip_blocklist`` list with a ``file`` gets the CIDRs read from
it: a plain list (one CIDR or address per line, ``#`` comments), AWS ``ip-ranges.json``
(``prefixes[].ip_prefix``, ``ipv6_prefixes[].ipv6_prefix``), Google ``cloud.json`` /
``goog.json`` (``prefixes[].ipv4Prefix`` / ``ipv6Prefix``) or an Azure Service Tags file
(``values[].properties.addressPrefixes``).

:class:`RulesWatcher` keeps the rules current without a restart: it re-reads them when
the rules file or a file it names changes (size or modification time), keeps the rules it
has when the new ones do not load, and appends a record of each change it applies to a
JSON-lines file: when, who (the rules file's owner), the digest of what was read, the
rules in force and which were added, removed or changed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import importlib.resources
import json
import logging
import os
import pwd
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec

from clickagg.core.rules.base import RuleError, RuleSet, RuleSpec
from clickagg.core.rules.iprange import fold_blocklist
from clickagg.core.rules.registry import compile_rules
from clickagg.jsonl import parse_jsonl

log = logging.getLogger(__name__)

BUILTIN = "builtin"
CRAWLER_PACKAGE = "crawler-user-agents"
_RULE_KEYS = {"id", "kind", "reason", "params", "enabled", "effective_from"}
_FILE_KEYS = {"include_builtin", "rules"}


def builtin_text() -> bytes:
    return (importlib.resources.files("clickagg.core.rules") / "builtin.toml").read_bytes()


def crawler_patterns() -> tuple[list[str], str]:
    """The crawler-user-agents package's patterns, and its version."""
    data = importlib.resources.files("crawleruseragents") / "crawler-user-agents.json"
    entries = json.loads(data.read_bytes())
    return [entry["pattern"] for entry in entries], importlib.metadata.version(CRAWLER_PACKAGE)


class _Reader:
    """One load: the files read (for the watcher) and the digest of all their bytes, and
    where the managed blocklist is kept (None: no managed list).

    ``confine_to``: rules text from outside (an HTTP request) may name files only under
    this directory, and none at all when it is None and ``files_allowed`` is false: a
    request must not make the server read, and echo back, any file it can."""

    def __init__(
        self,
        blocklist: Path | None = None,
        *,
        confine_to: Path | None = None,
        files_allowed: bool = True,
    ) -> None:
        self.files: list[Path] = []
        self.digest = hashlib.sha256()
        self.blocklist = blocklist
        self.confine_to = confine_to
        self.files_allowed = files_allowed

    def read(self, path: Path) -> bytes:
        if not self.files_allowed:
            raise RuleError(f"{path}: these rules may not name files")
        if self.confine_to is not None:
            root = self.confine_to.resolve()
            if not path.resolve().is_relative_to(root):
                raise RuleError(f"{path}: files must be under {root}")
        self.files.append(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RuleError(f"cannot read {path}: {exc.strerror or exc}") from None
        self._add(str(path), data)
        return data

    def read_optional(self, path: Path) -> bytes:
        """A file that may not exist yet (empty then), watched either way: the managed
        blocklist appears with its first entry."""
        if not path.exists():
            self.files.append(path)
            self._add(str(path), b"")
            return b""
        return self.read(path)

    def _add(self, name: str, data: bytes) -> None:
        self.digest.update(f"{name}\0{len(data)}\0".encode())
        self.digest.update(data)


def load_rules(path: Path | None = None, *, blocklist: Path | None = None) -> RuleSet:
    """The rules of ``path`` (None: the built-in rules), compiled; an ``ip_blocklist``
    rule with ``managed = true`` also holds the entries of the managed ``blocklist``
    record (``DATA_DIR/rules/blocklist.jsonl``), which is then one of the files watched."""
    reader = _Reader(blocklist)
    if path is None:
        data = builtin_text()
        reader._add(BUILTIN, data)
        specs = _specs(data, BUILTIN, Path("."), reader)
    else:
        specs = _specs(reader.read(path), str(path), path.parent, reader)
    return RuleSet(
        rules=compile_rules(specs),
        source=BUILTIN if path is None else str(path),
        digest=reader.digest.hexdigest(),
        files=tuple(str(f) for f in reader.files),
    )


def load_rules_text(
    text: str,
    *,
    source: str,
    base: Path | None = None,
    confine: bool = False,
    blocklist: Path | None = None,
) -> RuleSet:
    """Rules given as TOML text rather than a file (a candidate sent over HTTP), compiled
    as :func:`load_rules` compiles a file, ``include_builtin`` included. Files it names are
    relative to ``base``; with ``confine`` they must lie under it, and without a ``base``
    none may be named. ``blocklist``: the managed blocklist, as for :func:`load_rules`."""
    reader = _Reader(
        blocklist, confine_to=base if confine else None, files_allowed=base is not None
    )
    data = text.encode()
    reader._add(source, data)
    specs = _specs(data, source, base or Path("."), reader)
    return RuleSet(
        rules=compile_rules(specs),
        source=source,
        digest=reader.digest.hexdigest(),
        files=tuple(str(f) for f in reader.files),
    )


def _specs(data: bytes, source: str, base: Path, reader: _Reader) -> list[RuleSpec]:
    try:
        document = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RuleError(f"{source}: not a TOML file: {exc}") from None
    unknown = set(document) - _FILE_KEYS
    if unknown:
        raise RuleError(f"{source}: unknown keys {sorted(unknown)} (known: {sorted(_FILE_KEYS)})")
    rules = document.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise RuleError(f"{source}: `rules` must be an array of tables ([[rules]])")
    specs = [_spec(rule, source, base, reader) for rule in rules]
    if not document.get("include_builtin", False):
        return specs
    builtin = builtin_text()
    reader._add(BUILTIN, builtin)
    merged = {spec.id: spec for spec in _specs(builtin, BUILTIN, Path("."), reader)}
    merged.update((spec.id, spec) for spec in specs)  # same id: the file's rule replaces
    return list(merged.values())


def _spec(rule: Mapping[str, Any], source: str, base: Path, reader: _Reader) -> RuleSpec:
    where = f"{source}: rule {rule.get('id', '?')!r}"
    unknown = set(rule) - _RULE_KEYS
    if unknown:
        raise RuleError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_RULE_KEYS)})")
    for key in ("id", "kind", "reason"):
        if not isinstance(rule.get(key), str) or not rule[key]:
            raise RuleError(f"{where}: `{key}` must be a non-empty string")
    params = rule.get("params", {})
    enabled = rule.get("enabled", True)
    if not isinstance(params, dict) or not isinstance(enabled, bool):
        raise RuleError(f"{where}: `params` must be a table and `enabled` true or false")
    if enabled:
        params = RESOLVERS.get(rule["kind"], _as_is)(dict(params), base, reader, where)
    return RuleSpec(
        id=rule["id"],
        kind=rule["kind"],
        reason=rule["reason"],
        params=params,
        enabled=enabled,
        effective_from_ms=_effective_ms(rule.get("effective_from"), where),
    )


def _effective_ms(value: object, where: str) -> int | None:
    """A TOML date-time (naive: UTC) or an ISO-8601 string, as epoch ms."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            raise RuleError(f"{where}: effective_from {value!r} is not a date-time") from None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return int(value.timestamp() * 1000)
    if isinstance(value, dt.date):
        return int(dt.datetime.combine(value, dt.time(), tzinfo=dt.UTC).timestamp() * 1000)
    raise RuleError(f"{where}: effective_from must be a date-time, e.g. 2025-01-15T10:00:00Z")


Resolver = Callable[[dict[str, Any], Path, _Reader, str], dict[str, Any]]


def _as_is(params: dict[str, Any], base: Path, reader: _Reader, where: str) -> dict[str, Any]:
    return params


def _crawler_params(
    params: dict[str, Any], base: Path, reader: _Reader, where: str
) -> dict[str, Any]:
    source = params.pop("source", None)
    if source is None:
        return params
    if source != CRAWLER_PACKAGE:
        raise RuleError(f"{where}: source {source!r}: only {CRAWLER_PACKAGE!r} is known")
    patterns, version = crawler_patterns()
    reader._add(f"{CRAWLER_PACKAGE}=={version}", "\n".join(patterns).encode())
    return {**params, "patterns": [*patterns, *params.get("patterns", [])]}


def _blocklist_params(
    params: dict[str, Any], base: Path, reader: _Reader, where: str
) -> dict[str, Any]:
    lists = params.get("lists", [])
    if not isinstance(lists, list) or not all(isinstance(item, dict) for item in lists):
        raise RuleError(f"{where}: `params.lists` must be an array of tables")
    resolved = []
    for item in lists:
        entry = dict(item)
        file = entry.pop("file", None)
        fmt = entry.pop("format", "cidr")
        if file is not None:
            path = base / str(file)
            parse = RANGE_FORMATS.get(fmt)
            if parse is None:
                raise RuleError(f"{where}: format {fmt!r} unknown (known: {sorted(RANGE_FORMATS)})")
            try:
                cidrs = list(parse(reader.read(path)))
            except (ValueError, KeyError, TypeError) as exc:
                raise RuleError(f"{where}: {path} is not a {fmt} range file: {exc}") from None
            entry["cidrs"] = [*entry.get("cidrs", []), *cidrs]
        resolved.append(entry)
    managed = params.pop("managed", False)
    if not isinstance(managed, bool):
        raise RuleError(f"{where}: `params.managed` must be true or false")
    if managed:
        params["managed"] = _managed_entries(reader, where)
    return {**params, "lists": resolved}


def _managed_entries(reader: _Reader, where: str) -> list[dict[str, Any]]:
    if reader.blocklist is None:
        return []
    records = parse_jsonl(reader.read_optional(reader.blocklist).decode())
    try:
        entries = fold_blocklist(records)
    except (KeyError, TypeError, ValueError) as exc:
        raise RuleError(f"{where}: {reader.blocklist} is not a blocklist record: {exc}") from None
    return [msgspec.to_builtins(entry) for entry in entries]


def _plain_cidrs(data: bytes) -> Iterator[str]:
    for line in data.decode().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            yield text


def _aws_cidrs(data: bytes) -> Iterator[str]:
    document = json.loads(data)
    for prefix in document["prefixes"]:
        yield prefix["ip_prefix"]
    for prefix in document.get("ipv6_prefixes", []):
        yield prefix["ipv6_prefix"]


def _google_cidrs(data: bytes) -> Iterator[str]:
    for prefix in json.loads(data)["prefixes"]:
        yield prefix.get("ipv4Prefix") or prefix["ipv6Prefix"]


def _azure_cidrs(data: bytes) -> Iterator[str]:
    for value in json.loads(data)["values"]:
        yield from value["properties"]["addressPrefixes"]


RANGE_FORMATS: dict[str, Callable[[bytes], Iterator[str]]] = {
    "cidr": _plain_cidrs,
    "aws": _aws_cidrs,
    "google": _google_cidrs,
    "azure": _azure_cidrs,
}
RESOLVERS: dict[str, Resolver] = {
    "declared_crawler": _crawler_params,
    "ip_blocklist": _blocklist_params,
}


def _owner(path: str) -> str:
    try:
        uid = os.stat(path).st_uid
    except OSError:
        return "unknown"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _rule_digests(rules: RuleSet) -> dict[str, str]:
    def digest(spec: RuleSpec) -> str:
        text = json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    return {rule.name: digest(rule.spec) for rule in rules.rules}


def last_change(changes: Path) -> dict[str, Any] | None:
    """The newest record of a change log, or None."""
    try:
        lines = changes.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        if line.strip():
            try:
                record: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line after a crash
            return record
    return None


def record_change(changes: Path, rules: RuleSet, *, now_ms: int) -> dict[str, Any] | None:
    """Append a record of ``rules`` coming into force to ``changes`` (JSON lines), unless
    the newest record already has the same digest. Returns the record written."""
    previous = last_change(changes)
    if previous is not None and previous.get("digest") == rules.digest:
        return None
    before: dict[str, str] = (previous or {}).get("rules", {})
    after = _rule_digests(rules)
    record = {
        "time": dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).isoformat(timespec="milliseconds"),
        "time_ms": now_ms,
        "who": BUILTIN if rules.source == BUILTIN else _owner(rules.source),
        "source": rules.source,
        "digest": rules.digest,
        "rules": after,
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
        "changed": sorted(k for k in set(after) & set(before) if after[k] != before[k]),
    }
    changes.parent.mkdir(parents=True, exist_ok=True)
    with changes.open("a") as out:
        out.write(json.dumps(record, sort_keys=True) + "\n")
        out.flush()
        os.fsync(out.fileno())
    return record


def _signature(files: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    signature = []
    for name in files:
        try:
            st = os.stat(name)
        except OSError:
            signature.append((name, -1, -1))
        else:
            signature.append((name, st.st_mtime_ns, st.st_size))
    return tuple(signature)


class RulesWatcher:
    """The rules in force, re-read when their files change (checked at most every
    ``check_interval_s``). A change that does not load is logged and the rules in force
    stay; each change applied is recorded in ``changes`` (when given)."""

    def __init__(
        self,
        path: Path | None,
        *,
        changes: Path | None = None,
        blocklist: Path | None = None,
        check_interval_s: float = 1.0,
        now_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.path = path
        self.changes = changes
        self.blocklist = blocklist
        self.check_interval_s = check_interval_s
        self._now_ms = now_ms
        self.rules = load_rules(path, blocklist=blocklist)
        self._signature = _signature(self.rules.files)
        self._checked = time.monotonic()
        self._record()

    def _record(self) -> None:
        if self.changes is not None:
            record_change(self.changes, self.rules, now_ms=self._now_ms())

    def current(self) -> RuleSet:
        now = time.monotonic()
        if now - self._checked < self.check_interval_s:
            return self.rules
        self._checked = now
        return self.reload()

    def reload(self) -> RuleSet:
        """Re-read the rules if a file changed; the rules in force either way."""
        signature = _signature(self.rules.files)
        if signature == self._signature:
            return self.rules
        self._signature = signature
        try:
            rules = load_rules(self.path, blocklist=self.blocklist)
        except RuleError as exc:
            log.error("invalid-traffic rules not reloaded, keeping the rules in force: %s", exc)
            return self.rules
        if rules.digest != self.rules.digest:
            log.warning("invalid-traffic rules reloaded from %s: %s", rules.source, rules.ids)
            self.rules = rules
            self._record()
        self._signature = _signature(rules.files)
        return self.rules
