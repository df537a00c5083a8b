"""IP and CIDR blocklists (IPv4 and IPv6), matched vectorized.

Addresses live in one 128-bit space: an IPv6 address is itself, an IPv4 address is its
IPv4-mapped IPv6 address (``::ffff:a.b.c.d``), so one table serves both families and an
IPv4 client seen through a dual-stack socket matches its IPv4 entry. A 128-bit value is
held as 16 big-endian bytes (numpy ``S16``), whose byte order is the numeric order, so
``np.searchsorted`` works on it directly.

The table is built once per rule: every CIDR becomes a range; a range inside an earlier
or larger one is dropped (CIDR blocks are either nested or disjoint), which leaves
disjoint sorted ranges where "the last range starting at or before the address" is the
only candidate. A batch then costs: parse its *distinct* addresses to 128-bit keys with
polars string expressions (no per-address Python), one ``searchsorted`` and one compare,
and a map of the verdicts back onto the events.

Parsing accepts dotted-quad IPv4 and RFC 4291 IPv6 text (``::`` compression, an embedded
dotted quad in the last 32 bits, a ``%zone`` suffix, any case); anything else is not an
address and is never flagged by this rule.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import polars as pl

from clickagg.core.rules.base import Matcher, RuleError, RuleSpec, nulls
from clickagg.core.rules.registry import params_of, register_kind

KEY = np.dtype("S16")
_V4_MAPPED = 0xFFFF << 32
_V4 = r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$"
_GROUPS = r"[0-9a-f]{1,4}(?::[0-9a-f]{1,4})*"
_V6 = rf"^(?:{_GROUPS})?(?:::(?:{_GROUPS})?)?$"
_EMBEDDED_V4 = r":(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$"


def _keys(hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64]) -> npt.NDArray[np.bytes_]:
    pairs = np.empty((len(hi), 2), dtype=">u8")
    pairs[:, 0] = hi
    pairs[:, 1] = lo
    return pairs.view(KEY).reshape(len(hi))


def _quads(text: pl.Series, pattern: str) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.bool_]]:
    """(value, valid) of the dotted quad that ``pattern``'s four groups find in each text.
    Each step is materialized: polars would evaluate a shared sub-expression per use."""
    octets = (
        pl.DataFrame({"t": text})
        .select(pl.col("t").str.extract_groups(pattern).alias("g"))
        .unnest("g")
        .select(pl.all().cast(pl.UInt64, strict=False))
    )
    a, b, c, d = (pl.col(name) for name in octets.columns)
    quads = octets.select(
        (((a * 256 + b) * 256 + c) * 256 + d).fill_null(0).alias("value"),
        pl.all_horizontal([x.is_not_null() & (x <= 255) for x in (a, b, c, d)])
        .fill_null(False)
        .alias("ok"),
    )
    return quads["value"].to_numpy().astype(np.uint64), quads["ok"].to_numpy()


def parse_ips(ips: pl.Series) -> tuple[npt.NDArray[np.bytes_], npt.NDArray[np.bool_]]:
    """128-bit keys (``S16``) of address strings, and which strings are addresses."""
    count = ips.len()
    hi = np.zeros(count, dtype=np.uint64)
    lo = np.zeros(count, dtype=np.uint64)
    text = ips.cast(pl.String).fill_null("")
    value4, valid = _quads(text, _V4)
    lo[valid] = np.uint64(_V4_MAPPED) | value4[valid]
    six = np.flatnonzero(~valid & text.str.contains(":", literal=True).to_numpy())
    if len(six):
        v6_hi, v6_lo, v6_ok = _parse_v6(text.gather(six))
        hi[six], lo[six], valid[six] = v6_hi, v6_lo, v6_ok
    return _keys(hi, lo), valid


def _parse_v6(
    text: pl.Series,
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.bool_]]:
    lower = text.str.to_lowercase().str.replace(r"%.*$", "")
    has_embedded = lower.str.contains(".", literal=True).to_numpy()
    embedded, embedded_ok = _quads(lower, _EMBEDDED_V4)
    embedded = np.where(has_embedded, embedded, np.uint64(0))
    # An embedded dotted quad stands for the last two groups: parse "0:0" in its place and
    # add its 32 bits afterwards.
    plain = lower.str.replace(_EMBEDDED_V4, ":0:0")
    parts = plain.str.split("::")

    def groups(part: pl.Expr) -> pl.Expr:
        return part.fill_null("").str.split(":").list.eval(pl.element().filter(pl.element() != ""))

    frame = pl.DataFrame({"plain": plain, "parts": parts}).select(
        pl.col("plain").str.contains(_V6).alias("syntax"),
        pl.col("parts").list.len().alias("count"),
        groups(pl.col("parts").list.get(0, null_on_oob=True)).alias("head"),
        groups(pl.col("parts").list.get(1, null_on_oob=True)).alias("tail"),
    )
    frame = frame.with_columns(
        pl.col("head").list.len().alias("nh"), pl.col("tail").list.len().alias("nt")
    )
    compressed = pl.col("count") == 2
    sized = pl.when(compressed).then(pl.col("nh") + pl.col("nt") <= 7).otherwise(pl.col("nh") == 8)
    ok = (pl.col("syntax") & sized & (pl.col("count") <= 2)).fill_null(False)
    rows = frame.select(ok).to_series().to_numpy() & (~has_embedded | embedded_ok)
    good = frame.filter(pl.Series(rows))
    fill = (8 - pl.col("nh") - pl.col("nt")).clip(lower_bound=0)
    full = good.select(
        pl.concat_list("head", pl.lit("0").repeat_by(fill), "tail")
        .list.eval(pl.element().str.to_integer(base=16).cast(pl.UInt64))
        .list.to_array(8)
        .alias("g")
    )
    g = full["g"].to_numpy().astype(np.uint64).reshape(good.height, 8)
    hi = np.zeros(text.len(), dtype=np.uint64)
    lo = np.zeros(text.len(), dtype=np.uint64)
    hi[rows] = (g[:, 0] << 48) | (g[:, 1] << 32) | (g[:, 2] << 16) | g[:, 3]
    lo[rows] = (g[:, 4] << 48) | (g[:, 5] << 32) | (g[:, 6] << 16) | g[:, 7]
    lo[rows] |= embedded[rows]
    return hi, lo, rows


def network_range(cidr: str) -> tuple[int, int, str]:
    """(first, last) 128-bit values of a CIDR (or single address) and its normal text."""
    net = ipaddress.ip_network(cidr.strip(), strict=False)
    first, last = int(net.network_address), int(net.broadcast_address)
    if net.version == 4:
        first, last = first | _V4_MAPPED, last | _V4_MAPPED
    return first, last, str(net)


def _int_keys(values: Sequence[int]) -> npt.NDArray[np.bytes_]:
    return np.array([v.to_bytes(16, "big") for v in values], dtype=KEY)


@dataclass(frozen=True)
class RangeTable:
    """Disjoint sorted address ranges, each with a label (list name and CIDR)."""

    starts: npt.NDArray[np.bytes_]
    ends: npt.NDArray[np.bytes_]  # inclusive
    labels: pl.Series

    @classmethod
    def build(cls, lists: Sequence[tuple[str, Sequence[str]]]) -> RangeTable:
        """From named CIDR lists. Where CIDRs nest, the larger one is kept; of equal ones,
        the first list's."""
        entries = []
        for order, (name, cidrs) in enumerate(lists):
            for cidr in cidrs:
                first, last, text = network_range(cidr)
                entries.append((first, -last, order, f"{name} {text}"))
        entries.sort()
        kept: list[tuple[int, int, str]] = []
        for first, neg_last, _, label in entries:
            if kept and first <= kept[-1][1]:
                continue  # inside the range kept before it
            kept.append((first, -neg_last, label))
        return cls(
            starts=_int_keys([k[0] for k in kept]),
            ends=_int_keys([k[1] for k in kept]),
            labels=pl.Series("label", [k[2] for k in kept], dtype=pl.String),
        )

    def __len__(self) -> int:
        return len(self.starts)

    def lookup(
        self, keys: npt.NDArray[np.bytes_], valid: npt.NDArray[np.bool_]
    ) -> npt.NDArray[np.int64]:
        """Per key, the index of the range holding it, or -1."""
        found = np.full(len(keys), -1, dtype=np.int64)
        if not len(self.starts) or not len(keys):
            return found
        pos = np.searchsorted(self.starts, keys, side="right").astype(np.int64) - 1
        candidate = np.flatnonzero(valid & (pos >= 0))
        inside = keys[candidate] <= self.ends[pos[candidate]]
        found[candidate[inside]] = pos[candidate[inside]]
        return found


class BlockList(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    cidrs: list[str]


class ManagedEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A CIDR of the managed blocklist (``clickagg blocklist``, ``/admin/blocklist``) and
    the event times it applies to: from when it was added until it was removed."""

    cidr: str
    from_ms: int
    until_ms: int | None = None


class BlocklistParams(msgspec.Struct, forbid_unknown_fields=True):
    lists: list[BlockList] = msgspec.field(default_factory=list)
    # The managed list's entries (the rules loader reads them when a rule says
    # ``managed = true``).
    managed: list[ManagedEntry] = msgspec.field(default_factory=list)


MANAGED_LIST = "blocklist"


def fold_blocklist(records: Sequence[Mapping[str, Any]]) -> list[ManagedEntry]:
    """The managed list's entries from its append-only record of adds and removes (in
    the order recorded): an add opens an entry for its CIDR, a remove closes the open one.
    Adding a listed CIDR again, or removing one not listed, changes nothing."""
    open_from: dict[str, int] = {}
    closed: list[ManagedEntry] = []
    for record in records:
        cidr, time_ms = str(record["cidr"]), int(record["time_ms"])
        if record["op"] == "add":
            open_from.setdefault(cidr, time_ms)
        elif record["op"] == "remove" and cidr in open_from:
            closed.append(ManagedEntry(cidr, open_from.pop(cidr), time_ms))
    return closed + [ManagedEntry(cidr, since) for cidr, since in open_from.items()]


def managed_matcher(entries: Sequence[ManagedEntry]) -> Matcher:
    """Events whose ``ip`` is in an entry's CIDR and whose event time is in the entry's
    span: an address added to the list flags the events of its time of addition on,
    whenever they arrive, so the stream and the batch layer judge an event alike, and
    a removal does not clear the events flagged while it was listed."""
    if not entries:
        return lambda events: nulls("evidence", events.height)
    ranges = [network_range(entry.cidr) for entry in entries]
    union = RangeTable.build([(MANAGED_LIST, [text for _, _, text in ranges])])
    starts, ends = _int_keys([r[0] for r in ranges]), _int_keys([r[1] for r in ranges])
    spans = pl.DataFrame(
        {
            "entry": np.arange(len(entries)),
            "from_ms": [entry.from_ms for entry in entries],
            "until_ms": [entry.until_ms for entry in entries],
            "label": [f"{MANAGED_LIST} {text}" for _, _, text in ranges],
        },
        schema={"entry": pl.Int64, "from_ms": pl.Int64, "until_ms": pl.Int64, "label": pl.String},
    )

    def match(events: pl.DataFrame) -> pl.Series:
        ips = events["ip"]
        distinct = ips.drop_nulls().unique()
        keys, valid = parse_ips(distinct)
        hit = union.lookup(keys, valid) >= 0  # the few addresses any entry may hold
        if not hit.any():
            return nulls("evidence", ips.len())
        keys = keys[hit]
        inside = (keys[:, None] >= starts[None, :]) & (keys[:, None] <= ends[None, :])
        address, entry = np.nonzero(inside)
        pairs = pl.DataFrame(
            {"ip": distinct.filter(pl.Series(hit)).gather(address), "entry": entry.astype(np.int64)}
        ).join(spans, on="entry")
        rows = events.select(pl.int_range(pl.len()).alias("_row"), pl.col("ip"), pl.col("ts_ms"))
        found = (
            rows.join(pairs, on="ip")
            .filter(
                (pl.col("ts_ms") >= pl.col("from_ms"))
                & (pl.col("until_ms").is_null() | (pl.col("ts_ms") < pl.col("until_ms")))
            )
            .sort("_row", "from_ms", "entry")
            .unique("_row", keep="first")
            .select("_row", pl.format("{} in {}", "ip", "label").alias("evidence"))
        )
        evidence = nulls("evidence", ips.len())
        if not found.height:
            return evidence
        return evidence.scatter(found["_row"].to_numpy(), found["evidence"])

    return match


def ip_matcher(table: RangeTable) -> Matcher:
    """A matcher flagging events whose ``ip`` lies in one of ``table``'s ranges."""
    if not len(table):  # the built-in rule while the managed list is empty: parse nothing
        return lambda events: nulls("evidence", events.height)

    def match(events: pl.DataFrame) -> pl.Series:
        ips = events["ip"]
        distinct = ips.drop_nulls().unique()
        keys, valid = parse_ips(distinct)
        found = table.lookup(keys, valid)
        hit = found >= 0
        if not hit.any():
            return nulls("evidence", ips.len())
        flagged = distinct.filter(pl.Series(hit))
        evidence = pl.select(
            pl.format("{} in {}", pl.lit(flagged), pl.lit(table.labels.gather(found[hit])))
        ).to_series()
        return ips.replace_strict(flagged, evidence, default=None, return_dtype=pl.String)

    return match


@register_kind("ip_blocklist")
def ip_blocklist(spec: RuleSpec) -> Matcher:
    """Addresses on IP or CIDR blocklists, IPv4 and IPv6: named lists of CIDRs (the rules
    loader reads them from plain CIDR lists and the cloud providers' range files), and
    the managed list's entries when the rule says ``managed = true``: a static list's
    verdict first, the managed list's where no static list holds the address."""
    params = params_of(spec, BlocklistParams)
    try:
        table = RangeTable.build([(lst.name, lst.cidrs) for lst in params.lists])
        managed = managed_matcher(params.managed)
    except ValueError as exc:
        raise RuleError(f"rule {spec.id!r} ({spec.kind}): {exc}") from None
    static = ip_matcher(table)
    if not params.managed:
        return static

    def match(events: pl.DataFrame) -> pl.Series:
        return static(events).fill_null(managed(events))

    return match
