"""The managed IP blocklist: addresses and CIDRs added and removed at run time
(``clickagg blocklist``, ``/admin/blocklist``), without editing a rules file.

Kept as an append-only JSON-lines record (``DATA_DIR/rules/blocklist.jsonl``): each add
and remove with its time, who made it and why. Nothing is ever rewritten, so the record is
also the history: an entry flags the clicks of event times from its addition until its
removal (:func:`clickagg.core.rules.iprange.fold_blocklist`), and the batch layer, which
re-reads the record, judges past hours as the stream did. The rules that apply it are
``ip_blocklist`` rules that say ``managed = true`` (the built-in ``ip-blocklist`` does);
the worker watches this file with the rules' own files, so a change applies to events it
processes from its next rules check on (about a second).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clickagg.core.rules.iprange import fold_blocklist, network_range
from clickagg.jsonl import append_jsonl, read_jsonl

MAX_REASON_CHARS = 500

_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_V4 = rf"{_OCTET}(\.{_OCTET}){{3}}(/(3[0-2]|[12]?[0-9]))?"
_H = "[0-9a-fA-F]{1,4}"
_V6_FORMS = (
    rf"({_H}:){{7}}{_H}",
    rf"({_H}:){{1,7}}:",
    *(rf"({_H}:){{1,{7 - n}}}(:{_H}){{1,{n}}}" for n in range(1, 7)),
    rf":((:{_H}){{1,7}}|:)",
)
_V6 = "(" + "|".join(_V6_FORMS) + ")(/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?"
CIDR_PATTERN = f"^({_V4}|{_V6})$"
"""What the managed list takes: an IPv4 address (dotted quad, no leading zeros) or an IPv6
address (hex groups, ``::`` compression; no embedded dotted quad or zone), each with an
optional prefix length. The OpenAPI document states this same pattern."""
_CIDR = re.compile(CIDR_PATTERN)


class BlocklistError(ValueError):
    """An entry that cannot be added or removed; the message says which and why."""


def normal_cidr(text: object) -> str:
    """A CIDR or single address (IPv4 or IPv6) in its normal form (``10.0.0.0/8``,
    ``2001:db8::/32``; a single address gets /32 or /128)."""
    try:
        if not isinstance(text, str) or not _CIDR.match(text) or text.endswith("\n"):
            raise ValueError(text)
        return network_range(text)[2]
    except ValueError:
        raise BlocklistError(
            f"not an IP address or CIDR: {text!r} (e.g. 203.0.113.7, 203.0.113.0/24, 2001:db8::/32)"
        ) from None


@dataclass(frozen=True)
class Listed:
    """An entry on the list now: since when, by whom, why."""

    cidr: str
    since_ms: int
    by: str
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"cidr": self.cidr, "since_ms": self.since_ms, "by": self.by, "reason": self.reason}


class Blocklist:
    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def listed(self) -> list[Listed]:
        """The entries in force now, in CIDR order."""
        records = self.records()
        openers = {(r["cidr"], r["time_ms"]): r for r in records if r["op"] == "add"}
        out = []
        for entry in fold_blocklist(records):
            if entry.until_ms is None:  # still listed: the add that opened it says who, why
                opener = openers[(entry.cidr, entry.from_ms)]
                by, reason = opener.get("by", ""), opener.get("reason", "")
                out.append(Listed(entry.cidr, entry.from_ms, by, reason))
        return sorted(out, key=lambda listed: listed.cidr)

    def add(self, cidrs: Iterable[object], *, reason: str, by: str, now_ms: int) -> list[str]:
        """List every CIDR (all or none: each is checked first); the ones newly listed."""
        if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
            raise BlocklistError(
                f"reason must be a string of at most {MAX_REASON_CHARS} characters"
            )
        wanted = list(dict.fromkeys(normal_cidr(cidr) for cidr in cidrs))
        if not wanted:
            raise BlocklistError("cidrs must list at least one address or CIDR")
        listed = {entry.cidr for entry in self.listed()}
        new = [cidr for cidr in wanted if cidr not in listed]
        self._append(
            {"op": "add", "cidr": cidr, "time_ms": now_ms, "by": by, "reason": reason}
            for cidr in new
        )
        return new

    def remove(self, cidr: object, *, by: str, now_ms: int, reason: str = "") -> str:
        """Take an entry off the list (the CIDR as it was added, in any spelling); it
        still flags the clicks of the time it was listed."""
        normal = normal_cidr(cidr)
        if normal not in {entry.cidr for entry in self.listed()}:
            raise LookupError(f"{normal} is not on the blocklist")
        self._append(
            [{"op": "remove", "cidr": normal, "time_ms": now_ms, "by": by, "reason": reason}]
        )
        return normal

    def _append(self, records: Iterable[dict[str, Any]]) -> None:
        append_jsonl(self.path, records)
