"""The keyed second stage's pure half: its records, their partitioning by IP, the IP-keyed
rules over them (per-IP click velocity in event-time minutes, one IP clicking many ads in a
sliding window), and the corrections a verdict makes.

Stage 1 (one worker per partition of the log, which is partitioned by event id) appends
every fresh click it decided to an internal log partitioned by a stable hash of the IP, so
that all of an IP's clicks meet in one keyed partition whatever the number of log
partitions. Stage 2 judges them there. Appends are at-least-once (a crash between the
store commit and the append makes recovery append again), so stage 2 consumes
idempotently: per (keyed partition, source partition) it keeps the highest source offset
it has taken, and ignores a record at or below it (a source partition's records reach a
keyed partition in offset order, copies after the originals).

A verdict is the batch's verdict on the same clicks (``clickagg.core.rules.velocity``:
more than the limit clicks from one IP in one UTC minute flags every click of that
IP-minute, the ones before the threshold too; ``ip_ad_spread`` in
``clickagg.core.rules.behaviour``: a click whose IP clicked more than the limit distinct
ads in the window up to it): the same rule specs give the limits
(:class:`KeyedRules`), and where several rules flag a click the first in the rule set's
order names it, as in the batch's ``invalid_reason``. Clicks that a stage-1 rule had
already flagged count toward the rules (the batch counts them too) but are not corrected
again. Each click is corrected exactly once: when a rule first flags it, whatever the
split of the records into rounds, partitions and reads; a click corrected under one rule
that an earlier rule flags later (a minute's 61st click arriving after the first 60 were
flagged for another reason) is re-attributed, its reason moved, its counts untouched.

A rule applies from its ``effective_from`` (event time) on; the state keeps the records
of ``horizon_ms`` (event time) behind the newest one, plus the rules' reach, and does not
judge a record older than that (stage 1 never sends one: it would be late there).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import polars as pl
import polars_hash as plh
import pyarrow as pa
import xxhash

from clickagg.core import aggregate, ids
from clickagg.core.rules.base import RuleSet
from clickagg.core.rules.behaviour import SpreadParams
from clickagg.core.rules.registry import params_of
from clickagg.core.rules.velocity import VelocityParams
from clickagg.core.windows import MINUTE_MS, late_mask

RECORD_SCHEMA = pa.schema(
    [
        pa.field("ip", pa.string(), nullable=False),
        pa.field("user_id", pa.string()),
        pa.field("ad_id", pa.string(), nullable=False),
        pa.field("advertiser_id", pa.string()),
        pa.field("campaign_id", pa.string()),
        pa.field("country", pa.string()),
        pa.field("device", pa.string()),
        pa.field("browser", pa.string()),
        pa.field("ts_ms", pa.int64(), nullable=False),
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("source_partition", pa.int32(), nullable=False),
        pa.field("source_offset", pa.int64(), nullable=False),
        pa.field("spend_micros", pa.int64(), nullable=False),  # what stage 1 billed
        # False: a stage-1 rule already flagged it (counts toward the minute, not corrected)
        pa.field("counted", pa.bool_(), nullable=False),
    ]
)
"""One fresh click as the keyed log carries it (Arrow frames, readable without clickagg)."""

NO_OFFSET = -1


def keyed_partition(ip: str, partitions: int) -> int:
    """Stable across processes, versions and machines (not Python's salted ``hash``)."""
    return xxhash.xxh3_64_intdigest(ip.encode()) % partitions


def keyed_records(kept: pl.DataFrame, partitions: int) -> dict[int, pa.Table]:
    """The records of a round's kept events (``BatchOutcome.kept``: fresh events with
    ``invalid`` and ``spend_micros``), by keyed partition, each in source offset order.
    Only clicks with an IP: an IP-less click has no key (the batch rule skips it too)."""
    clicks = kept.filter((pl.col("event_type") == ids.CLICK) & pl.col("ip").is_not_null())
    if clicks.is_empty():
        return {}
    return records_by_partition(clicks, "ip", partitions, RECORD_SCHEMA, leading=10)


def records_by_partition(
    clicks: pl.DataFrame,
    key: str,
    partitions: int,
    schema: pa.Schema,
    *,
    leading: int,
) -> dict[int, pa.Table]:
    """A keyed family's records of ``clicks`` (``schema``: its first ``leading`` columns
    as they are, then the source position, spend and whether stage 1 counted it), by the
    keyed partition of their ``key`` (:func:`key_partitions`).

    Each source partition's records stay in offset order (stage 2 takes a source's records
    in that order: ``accept``), and the sources are interleaved by event time: ordered by
    the newest event time of their source up to them (a running maximum, which offset order
    keeps), so no record follows records of other sources far newer than itself. Taken one
    source after the other, a round that spans more event time than the keyed stage's
    horizon (a backlog, a replay) would put a source's first records that far behind the
    previous source's last, and stage 2 would leave them to the batch."""
    records = (
        clicks.select(
            *schema.names[:leading],
            pl.col("partition").cast(pl.Int32).alias("source_partition"),
            pl.col("offset").alias("source_offset"),
            pl.col("spend_micros").cast(pl.Int64),
            (~pl.col("invalid")).alias("counted"),
            key_partitions(key, partitions).alias("_k"),
        )
        .sort("source_partition", "source_offset")
        .with_columns(pl.col("ts_ms").cum_max().over("source_partition").alias("_newest"))
        .sort("_newest", "source_partition", "source_offset")
        .drop("_newest")
    )
    return {
        int(k): part.drop("_k").to_arrow().cast(schema)
        for (k,), part in records.partition_by("_k", as_dict=True, maintain_order=True).items()
    }


def key_partitions(column: str, partitions: int) -> pl.Expr:
    """:func:`keyed_partition` of every key of ``column`` at once (the same xxh3-64 of the
    UTF-8 bytes, vectorized: no Python call per click)."""
    return (plh.col(column).nchash.xxh3_64() % partitions).cast(pl.Int64)


VELOCITY_KIND = "ip_click_velocity"


@dataclass(frozen=True)
class VelocityRule:
    """``ip_click_velocity`` as the keyed stage applies it: more than
    ``max_clicks_per_minute`` clicks from one IP in one UTC minute flag every click of that
    IP-minute. Only clicks at or after ``effective_from_ms`` are counted (as the batch's
    matcher sees only the clicks the rule applies to)."""

    rule_id: str
    reason: str
    max_clicks_per_minute: int
    effective_from_ms: int | None = None
    kind: ClassVar[str] = VELOCITY_KIND

    @property
    def reach_ms(self) -> int:
        """How far before a click the clicks that decide its verdict lie."""
        return MINUTE_MS


SPREAD_KIND = "ip_ad_spread"


@dataclass(frozen=True)
class SpreadRule:
    """``ip_ad_spread`` as the keyed stage applies it: a click from an IP that clicked more
    than ``max_ads`` distinct ads in the ``window_minutes`` up to and including it (a
    sliding window ending at each click; equal times share one). Every click of the IP
    counts toward the windows, the ones before ``effective_from_ms`` too (the batch's
    matcher sees them all); only clicks from it on are flagged."""

    rule_id: str
    reason: str
    max_ads: int
    window_minutes: int
    effective_from_ms: int | None = None
    kind: ClassVar[str] = SPREAD_KIND

    @property
    def reach_ms(self) -> int:
        return self.window_minutes * MINUTE_MS


KeyedRule = VelocityRule | SpreadRule
_KINDS: dict[str, type[KeyedRule]] = {VELOCITY_KIND: VelocityRule, SPREAD_KIND: SpreadRule}


@dataclass(frozen=True)
class KeyedRules:
    """The IP-keyed rules in force, in the rule set's order: where several flag one click,
    the first names it (``invalid_reason``), as the batch's ``RuleSet.batch_reasons`` does.
    A value, serializable (:meth:`to_json`), so what a keyed commit was judged by can be
    recorded with it and read back."""

    rules: tuple[KeyedRule, ...] = ()

    @classmethod
    def from_ruleset(cls, ruleset: RuleSet) -> KeyedRules:
        """The enabled rules of the kinds the keyed stage applies, from the rules in force."""
        rules: list[KeyedRule] = []
        for compiled in ruleset.rules:
            spec = compiled.spec
            if not spec.enabled or spec.kind not in _KINDS:
                continue
            rule: KeyedRule
            if spec.kind == VELOCITY_KIND:
                limit = params_of(spec, VelocityParams).max_clicks_per_minute
                rule = VelocityRule(spec.id, spec.reason, limit, spec.effective_from_ms)
            else:
                spread = params_of(spec, SpreadParams)
                rule = SpreadRule(
                    spec.id,
                    spec.reason,
                    spread.max_ads,
                    spread.window_minutes,
                    spec.effective_from_ms,
                )
            rules.append(rule)
        return cls(tuple(rules))

    @property
    def ids(self) -> list[str]:
        return [rule.rule_id for rule in self.rules]

    @property
    def reach_ms(self) -> int:
        """How far before a click the records its verdicts need reach (at least a minute:
        what the state keeps with no rule in force)."""
        return max((rule.reach_ms for rule in self.rules), default=MINUTE_MS)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): equal specs give equal text."""
        rules = [{"kind": rule.kind, **asdict(rule)} for rule in self.rules]
        return json.dumps({"rules": rules}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> KeyedRules:
        rules: list[KeyedRule] = []
        for fields in json.loads(text)["rules"]:
            kind = fields.pop("kind")
            if kind not in _KINDS:
                raise ValueError(f"keyed rule {fields.get('rule_id')!r}: unknown kind {kind!r}")
            rules.append(_KINDS[kind](**fields))
        return cls(tuple(rules))


VERDICT_SCHEMA = pa.schema(
    [
        *RECORD_SCHEMA,
        # where the record is in the keyed log, when the records consumed said (stage 2's
        # do: the corrections archive names it); null otherwise
        pa.field("keyed_offset", pa.int64()),
        pa.field("rule_id", pa.string(), nullable=False),
        pa.field("evidence", pa.string(), nullable=False),
        # null: the click is newly flagged (a correction); else the rule it was corrected
        # under before, which an earlier rule now flagging it replaces (``invalid_reason``)
        pa.field("previous_rule_id", pa.string()),
    ]
)
"""Stage 2's verdicts: counted clicks newly flagged, and flagged ones re-attributed."""

_STATE_SCHEMA = pl.Schema(
    [*pl.Schema(RECORD_SCHEMA).items(), ("keyed_offset", pl.Int64()), ("_rule", pl.String())]
)  # the records kept (in arrival order), the rule each stands corrected under


def corrections(verdicts: pa.Table) -> int:
    """How many clicks the verdicts newly flag (re-attributions are not corrections)."""
    return int(verdicts["previous_rule_id"].null_count)


@dataclass
class KeyedWindows:
    """One keyed partition's stage-2 state: a function of the records it consumed (and the
    rules), so replaying the keyed log up to the committed offset rebuilds it exactly, in
    whatever chunks the replay reads it.

    It keeps the accepted records of the last ``horizon_ms`` + the rules' reach of event
    time as one frame; each :meth:`consume` judges again the kept clicks of the IPs it
    got records for, from the earliest new record's time back by the reach (the only
    clicks whose verdict a new record can change, and every click those verdicts need).
    Verdicts only ever grow as records arrive, so "newly flagged" is "flagged now and not
    corrected before"."""

    horizon_ms: int
    high_water: dict[int, int] = field(default_factory=dict)
    max_event_ms: int = 0
    _kept: pl.DataFrame = field(default_factory=lambda: _STATE_SCHEMA.to_frame())
    # The records are complete for event times from here on (None: from the log's start).
    context_from_ms: int | None = None

    def start_context(self, from_ms: int) -> None:
        """Records follow a gap (stage 1 started while the stream ran): complete only from
        ``from_ms``. The IP rules count clicks (per minute, distinct ads in a window), so a
        gap can only hide clicks from a count: a click a rule flags without them is flagged
        by the batch too, and one they would have flagged is left to the batch. But the
        gap can change WHICH rule names a click: an earlier rule in the set might flag it
        with the gap's clicks. So a verdict naming a rule is given only when every earlier
        rule's context for the click lies after the gap (:func:`_named_for_sure`)."""
        self.context_from_ms = later_bound(self.context_from_ms, from_ms)

    def consume(self, records: pa.Table | pl.DataFrame, rules: KeyedRules) -> pa.Table:
        """Take records (``RECORD_SCHEMA``) in keyed-log order; return the verdicts
        (``VERDICT_SCHEMA``, in the records' order): each counted click once when a rule
        first flags it, and again only when an earlier rule of ``rules`` flags it later.

        Copies (at or below their source's high-water offset) are skipped. A record older
        than the newest event time before it by more than ``horizon_ms`` is not judged nor
        counted: stage 1 never sends one (it would be late there), and what it would need
        may already be forgotten."""
        batch = records if isinstance(records, pl.DataFrame) else pl.from_arrow(records)
        assert isinstance(batch, pl.DataFrame)
        if "keyed_offset" not in batch.columns:
            batch = batch.with_columns(pl.lit(None, pl.Int64).alias("keyed_offset"))
        new = self._accept(batch)
        kept = pl.concat([self._kept, new]) if new.height else self._kept
        if not rules.rules or not new.height:
            self._kept = self._forget(kept, rules)
            return VERDICT_SCHEMA.empty_table()
        # Kept in arrival order: new records are appended, old ones only filtered out.
        since = new.group_by("ip").agg((pl.col("ts_ms").min() - rules.reach_ms).alias("_since"))
        bound = kept.select("ip").join(since, on="ip", how="left", maintain_order="left")
        touched = (kept["ts_ms"] >= bound["_since"]).fill_null(False).to_numpy()
        rows = np.flatnonzero(touched)
        changed, first = _judge(kept.select(_JUDGED)[rows], rules)
        at, first = rows[changed], first[changed]
        if self.context_from_ms is not None and len(at):
            sure = _named_for_sure(kept["ts_ms"].to_numpy()[at], first, rules, self.context_from_ms)
            at, first = at[sure], first[sure]
        rule_ids = pl.Series(rules.ids, dtype=pl.String).gather(first)
        verdicts = kept[at].select(
            *RECORD_SCHEMA.names,
            "keyed_offset",
            rule_ids.alias("rule_id"),
            _evidence(rules, pl.Series(first)).alias("evidence"),
            pl.col("_rule").alias("previous_rule_id"),
        )
        self._kept = self._forget(
            kept.with_columns(kept["_rule"].scatter(at, rule_ids)) if len(at) else kept, rules
        )
        return verdicts.to_arrow().cast(VERDICT_SCHEMA)

    def kept(self) -> pl.DataFrame:
        """The state besides the marks: the records kept, each with the rule it stands
        corrected under (what a snapshot saves)."""
        return self._kept

    @classmethod
    def restore(
        cls,
        horizon_ms: int,
        *,
        high_water: dict[int, int],
        max_event_ms: int,
        kept: pl.DataFrame,
        context_from_ms: int | None = None,
    ) -> KeyedWindows:
        """The windows a snapshot saved (:meth:`kept` and the marks)."""
        return cls(
            horizon_ms,
            high_water=dict(high_water),
            max_event_ms=max_event_ms,
            _kept=kept.select(_STATE_SCHEMA.names()).cast(_STATE_SCHEMA),
            context_from_ms=context_from_ms,
        )

    def _accept(self, batch: pl.DataFrame) -> pl.DataFrame:
        """The batch's records that are neither copies nor too late; moves the high-water
        marks and the newest event time."""
        fresh, self.max_event_ms = accept(
            batch, self.high_water, max_event_ms=self.max_event_ms, horizon_ms=self.horizon_ms
        )
        if not fresh.height:
            return _STATE_SCHEMA.to_frame()
        accepted = fresh.with_columns(pl.lit(None, pl.String).alias("_rule"))
        return accepted.select(_STATE_SCHEMA.names()).cast(_STATE_SCHEMA)

    def _forget(self, kept: pl.DataFrame, rules: KeyedRules) -> pl.DataFrame:
        """Records that no accepted record can reach any more (it would be too late)."""
        since = self.max_event_ms - self.horizon_ms - rules.reach_ms
        if not kept.height or kept.select(pl.col("ts_ms").min()).item() >= since:
            return kept
        return kept.filter(pl.col("ts_ms") >= since)


def later_bound(bound: int | None, other: int | None) -> int | None:
    """The later of two "the records are complete from" event times (None: from the
    log's start)."""
    if bound is None:
        return other
    return bound if other is None else max(bound, other)


def accept(
    batch: pl.DataFrame, high_water: dict[int, int], *, max_event_ms: int, horizon_ms: int
) -> tuple[pl.DataFrame, int]:
    """A keyed partition's records (in keyed-log order) that are neither copies (at or below
    their source's high-water offset, or behind an earlier record of the same source) nor
    more than ``horizon_ms`` older than the newest event time before them; moves
    ``high_water`` (in place) and returns the new newest event time. Shared by both keyed
    families: whichever the key, a source partition's records reach a keyed partition in
    offset order, copies after the originals."""
    if not batch.height:
        return batch, max_event_ms
    # In numpy, per source partition (a handful): polars' window expressions and group-by
    # cost milliseconds of fixed overhead per call on batches of a few thousand records.
    source = batch["source_partition"].to_numpy()
    offsets = batch["source_offset"].to_numpy()
    keep = np.zeros(batch.height, dtype=np.bool_)
    for partition in np.unique(source).tolist():
        rows = np.flatnonzero(source == partition)
        mine = offsets[rows]
        # above the mark and above every earlier record of the same source in the batch
        floor = np.empty(len(mine), dtype=np.int64)
        floor[0] = high_water.get(partition, NO_OFFSET)
        np.maximum(np.maximum.accumulate(mine[:-1]), floor[0], out=floor[1:])
        fresh = mine > floor
        keep[rows] = fresh
        if fresh.any():
            high_water[partition] = int(mine[fresh].max())
    taken = np.flatnonzero(keep)
    if len(taken):
        late, max_event_ms = late_mask(
            batch["ts_ms"].to_numpy()[taken],
            max_event_ms=max_event_ms,
            allowed_lateness_ms=horizon_ms,
        )
        keep[taken[late]] = False
    return batch.filter(pl.Series(keep)), max_event_ms


_JUDGED = ["ip", "ad_id", "ts_ms", "counted", "_rule"]


def _judge(
    judged: pl.DataFrame, rules: KeyedRules
) -> tuple[np.ndarray[Any, np.dtype[np.bool_]], np.ndarray[Any, np.dtype[np.int64]]]:
    """Every rule's verdict on the kept records given: which counted clicks changed rule
    (newly flagged, or flagged by an earlier rule than the one they stand corrected
    under), and the index of the first rule that flags each record."""
    flags = np.stack([_flags(judged, rule) for rule in rules.rules])
    hit = flags.any(axis=0)
    first = flags.argmax(axis=0).astype(np.int64)  # the first rule in order that flags it
    rank = {rule_id: i for i, rule_id in enumerate(rules.ids)}
    was = (
        judged["_rule"]
        .replace_strict(rank, default=len(rank), return_dtype=pl.Int64)  # a rule since gone
        .fill_null(len(rank) + 1)  # never corrected
        .to_numpy()
    )
    return judged["counted"].to_numpy() & hit & (first < was), first


def _named_for_sure(
    ts_ms: np.ndarray[Any, np.dtype[np.int64]],
    first: np.ndarray[Any, np.dtype[np.int64]],
    rules: KeyedRules,
    context_from_ms: int,
) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """Which verdicts (clicks at ``ts_ms``, flagged first by rule ``first``) the batch gives
    too when the records are complete only from ``context_from_ms``. The rule that flags
    a click still flags it with more clicks (the rules count); an EARLIER rule might flag
    it only with them, unless the clicks that decide its verdict all lie after the gap:
    the click's UTC minute (velocity), the window up to and including it (spread)."""
    sure = np.ones(len(ts_ms), dtype=np.bool_)
    for index, rule in enumerate(rules.rules):
        if isinstance(rule, SpreadRule):
            context_start = ts_ms - rule.reach_ms
        else:
            context_start = ts_ms - ts_ms % MINUTE_MS
        sure &= ~((first > index) & (context_start < context_from_ms))
    return sure


def _flags(kept: pl.DataFrame, rule: KeyedRule) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """Which of the kept records ``rule`` flags (all of an IP's kept records in the reach
    of the ones judged are among them)."""
    ts = kept["ts_ms"].to_numpy()
    applies = (
        np.ones(len(ts), dtype=np.bool_)
        if rule.effective_from_ms is None
        else ts >= rule.effective_from_ms
    )
    if isinstance(rule, SpreadRule):
        return applies & (_distinct_ads(kept, rule.reach_ms) > rule.max_ads)
    minute = pl.when(pl.Series(applies)).then(pl.col("ts_ms") - pl.col("ts_ms") % MINUTE_MS)
    n = kept.select(pl.len().over(pl.col("ip"), minute)).to_series().to_numpy()
    return applies & (n > rule.max_clicks_per_minute)


def _distinct_ads(kept: pl.DataFrame, window_ms: int) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Per kept record, the distinct ads its IP clicked in the ``window_ms`` up to and
    including its time: a click at ``t`` keeps its ad present over ``[t, t + window]``, so
    the count at a time is how many of the IP's presence intervals (one ad's overlapping
    ones merged) cover it, found by two binary searches per record."""
    new_ip = (pl.col("ip") != pl.col("ip").shift()).fill_null(True)
    new_ad = new_ip | (pl.col("ad_id") != pl.col("ad_id").shift()).fill_null(True)
    gap = (pl.col("ts_ms").diff() > window_ms).fill_null(True)
    ordered = (
        kept.select("ip", "ad_id", "ts_ms")
        .with_row_index("_row")
        .sort("ip", "ad_id", "ts_ms")
        .select(
            "_row",
            "ts_ms",
            new_ip.cum_sum().cast(pl.Int64).alias("_ip"),
            (new_ad | gap).alias("_opens"),
        )
    )
    row, ts, ip = (ordered[name].to_numpy() for name in ("_row", "ts_ms", "_ip"))
    first = np.flatnonzero(ordered["_opens"].to_numpy())  # where each interval opens
    last = np.append(first[1:] - 1, len(ts) - 1)  # its last click
    # Times as ranks (equal stays equal, order stays order), so (ip, time) fits one int64.
    times = np.concatenate([ts, ts[last] + window_ms])
    rank = np.unique(times, return_inverse=True)[1].astype(np.int64)
    stride = len(times) + 1
    at = ip * stride + rank[: len(ts)]
    opened = np.sort(at[first])
    closed = np.sort(ip[last] * stride + rank[len(ts) :])
    # Intervals of earlier IPs opened and closed before ``at``: they cancel out.
    covering = np.searchsorted(opened, at, side="right") - np.searchsorted(closed, at, side="left")
    out = np.empty(len(ts), dtype=np.int64)
    out[row] = covering
    return out


def _evidence(rules: KeyedRules, first: pl.Series) -> pl.Expr:
    """Worded as the batch's matchers word theirs, with what the verdict rests on (the
    rule's limit, which the count is above: the count itself may still grow)."""
    minute = pl.from_epoch(pl.col("ts_ms") - pl.col("ts_ms") % MINUTE_MS, time_unit="ms")
    moment = pl.from_epoch(pl.col("ts_ms"), time_unit="ms")
    text: pl.Expr = pl.lit(None, pl.String)
    for i, rule in reversed(list(enumerate(rules.rules))):
        if isinstance(rule, SpreadRule):
            said = pl.concat_str(
                pl.lit("ip "),
                pl.col("ip"),
                pl.lit(
                    f": more than {rule.max_ads} distinct ads clicked in the "
                    f"{rule.window_minutes} min to "
                ),
                moment.dt.strftime("%Y-%m-%dT%H:%M:%S%.3fZ"),
            )
        else:
            said = pl.concat_str(
                pl.lit("ip "),
                pl.col("ip"),
                pl.lit(f": more than {rule.max_clicks_per_minute} clicks in minute "),
                minute.dt.strftime("%Y-%m-%dT%H:%MZ"),
            )
        text = pl.when(pl.lit(first) == i).then(said).otherwise(text)
    return text


def correction_deltas(verdicts: pa.Table) -> tuple[pa.Table, dict[str, pa.Table]]:
    """What the verdicts (``VERDICT_SCHEMA``) change, as deltas the store adds like any
    round's. A newly flagged click: per minute row and per dimension row clicks -1, spend
    -(what was billed) and invalid_clicks +1; per ``invalid_reason`` row (its rule's id)
    invalid_clicks +1. A re-attributed one: its ``invalid_reason`` moves from the previous
    rule's row to its rule's, nothing else changes. Unique-user sketches cannot be
    decremented (the user was seen, and stays counted), so ``users`` is null: the
    correction leaves them as they are."""
    if not verdicts.num_rows:
        return aggregate.MINUTE_SCHEMA.empty_table(), aggregate.empty_dimension_deltas()
    frame = pl.from_arrow(verdicts)
    assert isinstance(frame, pl.DataFrame)
    frame = frame.with_columns((pl.col("ts_ms") - pl.col("ts_ms") % MINUTE_MS).alias("minute_ms"))
    flagged = frame.filter(pl.col("previous_rule_id").is_null())
    unknown = aggregate.UNKNOWN
    measures = [
        -pl.len().cast(pl.Int64).alias("clicks"),
        pl.lit(0, pl.Int64).alias("impressions"),
        -pl.col("spend_micros").sum().cast(pl.Int64).alias("spend_micros"),
        pl.len().cast(pl.Int64).alias("invalid_clicks"),
    ]

    def grouped(rows: pl.DataFrame, keys: Sequence[str], agg: list[pl.Expr]) -> pl.DataFrame:
        return (
            rows.with_columns(pl.col(k).fill_null(unknown) for k in keys)
            .group_by("ad_id", "minute_ms", *keys)
            .agg(agg)
            .sort("ad_id", "minute_ms", *keys)
            .with_columns(pl.lit(None, pl.Binary).alias("users"))
        )

    def table(rows: pl.DataFrame, schema: pa.Schema) -> pa.Table:
        return rows.select(schema.names).to_arrow().cast(schema)

    reason = aggregate.REASON_DIMENSION
    moved = frame.filter(pl.col("previous_rule_id").is_not_null())
    to_rule = frame.select(
        "ad_id", "minute_ms", pl.col("rule_id").alias(reason), pl.lit(1).alias("_n")
    )
    from_rule = moved.select(
        "ad_id", "minute_ms", pl.col("previous_rule_id").alias(reason), pl.lit(-1).alias("_n")
    )
    reasons = grouped(
        pl.concat([to_rule, from_rule]),
        [reason],
        [
            pl.lit(0, pl.Int64).alias("clicks"),
            pl.lit(0, pl.Int64).alias("impressions"),
            pl.lit(0, pl.Int64).alias("spend_micros"),
            pl.col("_n").sum().cast(pl.Int64).alias("invalid_clicks"),
        ],
    ).filter(pl.col("invalid_clicks") != 0)
    minute = table(grouped(flagged, aggregate.OWNERS, measures), aggregate.MINUTE_SCHEMA)
    dimensions = {
        name: table(
            reasons if name == reason else grouped(flagged, [name], measures),
            aggregate.DIMENSION_SCHEMAS[name],
        )
        for name in aggregate.DIMENSIONS
    }
    return minute, dimensions
