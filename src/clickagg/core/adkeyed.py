"""The keyed stage's third family, keyed by *ad*: ``no_impression_click`` and ``ctr_spike``
in the stream, each decided by the batch's own definition of the rule.

Both rules judge a click by the other events of its ad: whether its visitor saw the ad
before (and whether the ad's impressions are sent at all), and the ad's CTR in the click's
hour against its own trailing baseline. One ad's events are spread over every partition of
the log, so stage 1 appends every fresh event of an ad, impressions too, to a third
internal log partitioned by a stable hash of the ad, and stage 2 judges there
(:class:`AdWindows`). Appends are at-least-once and consumed idempotently, exactly as in
the other families (``clickagg.core.keyed.accept``).

Why a click is decided only once its whole hour is past the horizon. The batch judges an
hour ``H`` with the events of ``[H - lookback, H + 1 h)`` (``clickagg.batch.reconcile``):
``ctr_spike`` counts the whole hour's clicks and impressions, and ``no_impression_click``
judges only ads with enough impressions among the events it sees, the whole hour's
included. So hour ``H`` is decided when no record before ``H + 1 h`` can still be accepted:
once the newest event time is past it by the horizon (the stream's allowed lateness plus
slack). The verdict latency is therefore up to an hour plus the horizon (the other
families': a step, or the horizon); a click is decided once and never re-attributed within
this family, as in the visitor family.

Exactness against the batch. The stream calls the batch's own matcher
(``behaviour.no_impression_click``) on the same events (the ad's partition holds every
event of the ad, and the rule looks at one ad at a time), and for ``ctr_spike`` the same
spike definition (``behaviour.ctr_spikes``) over the same per-(ad, hour) counts: the state
keeps the counts of the baseline's day, not its events. What the stream cannot match, as
in the other families: events stage 1 dropped as late, which the batch counts.

Cost. This family's log carries every event with an ad, impressions included (the other
families carry clicks only), so stage 1 appends to it only while one of its rules is in
force (``ad_records``' caller decides): turned on, a rule judges from the first whole hour
whose context the stage holds. The state keeps the undecided hours' clicks whole, a day of
per-(ad, hour) counts (all ``ctr_spike`` needs of the impressions) and, only while
``no_impression_click`` is in force, the impressions of its window and the undecided
hours as their visitor, ad and time: impressions are most events, so with ``ctr_spike``
alone none is kept. Turned on while the stream runs, ``no_impression_click`` judges the
hours whose window starts after the first impression it kept; the hours before are left
to the batch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import polars as pl
import pyarrow as pa

from clickagg.core import ids
from clickagg.core.keyed import accept, later_bound, records_by_partition
from clickagg.core.rules.base import RuleSet, named_event_types
from clickagg.core.rules.behaviour import (
    CtrSpikeParams,
    NoImpressionParams,
    ad_hour_counts,
    ctr_spikes,
    no_impression_evidence,
    visitor_key,
)
from clickagg.core.rules.registry import params_of
from clickagg.core.visitor import VISITOR_RECORD_SCHEMA
from clickagg.core.windows import HOUR_MS, MINUTE_MS

_VISITOR_FIELDS = list(VISITOR_RECORD_SCHEMA)
_AT_EVENT_ID = VISITOR_RECORD_SCHEMA.get_field_index("event_id") + 1
AD_RECORD_SCHEMA = pa.schema(
    [
        # the visitor may be unknown here (null): an impression without one still counts
        _VISITOR_FIELDS[0].with_nullable(True),
        *_VISITOR_FIELDS[1:_AT_EVENT_ID],
        pa.field("event_type", pa.uint8(), nullable=False),  # ``clickagg.core.ids`` codes
        *_VISITOR_FIELDS[_AT_EVENT_ID:],
    ]
)
"""One fresh event of an ad (click or impression), as the ad-keyed log carries it."""

AD_VERDICT_SCHEMA = pa.schema(
    [
        *(f for f in AD_RECORD_SCHEMA if f.name != "event_type"),
        pa.field("keyed_offset", pa.int64()),
        pa.field("rule_id", pa.string(), nullable=False),
        pa.field("evidence", pa.string(), nullable=False),
        pa.field("previous_rule_id", pa.string()),  # always null here: decided once
    ]
)

_STATE_SCHEMA = pl.Schema([*pl.Schema(AD_RECORD_SCHEMA).items(), ("keyed_offset", pl.Int64())])
_SEEN_SCHEMA = pl.Schema({"visitor": pl.String(), "ad_id": pl.String(), "ts_ms": pl.Int64()})
_COUNTS_SCHEMA = pl.Schema(
    {"ad_id": pl.String, "_hour": pl.Int64, "_c": pl.UInt32, "_i": pl.UInt32}
)


def _review_only(rule: NoImpressionRule | CtrSpikeRule) -> bool:
    return isinstance(rule, CtrSpikeRule) and not rule.exclude


def ad_records(kept: pl.DataFrame, partitions: int) -> dict[int, pa.Table]:
    """The records of a round's kept events (``BatchOutcome.kept``, clicks and impressions),
    by ad-keyed partition, each in source offset order. Only events with an ad."""
    events = kept.filter(pl.col("ad_id").is_not_null())
    if events.is_empty():
        return {}
    return records_by_partition(
        events.with_columns(visitor_key().alias("visitor")),
        "ad_id",
        partitions,
        AD_RECORD_SCHEMA,
        leading=AD_RECORD_SCHEMA.get_field_index("source_partition"),
    )


NO_IMPRESSION_KIND = "no_impression_click"
CTR_SPIKE_KIND = "ctr_spike"


@dataclass(frozen=True)
class NoImpressionRule:
    """``no_impression_click`` as the ad-keyed stage applies it (a recordable value)."""

    rule_id: str
    reason: str
    window_minutes: int
    min_ad_impressions: int = 1
    effective_from_ms: int | None = None
    kind: ClassVar[str] = NO_IMPRESSION_KIND

    @property
    def lookback_ms(self) -> int:
        return self.window_minutes * MINUTE_MS

    def evidence(self, frame: pl.DataFrame) -> pl.Series:
        """The batch's own matcher over ``frame`` (an hour's clicks and the impressions of
        it and its lookback, named event types, each with its ``visitor`` key)."""
        return no_impression_evidence(
            frame, self.window_minutes, self.min_ad_impressions, key="visitor"
        )


@dataclass(frozen=True)
class CtrSpikeRule:
    """``ctr_spike`` as the ad-keyed stage applies it. ``exclude`` (``exclude = true``): its
    clicks are corrected like any rule's; otherwise (the default) they are only counted
    for review (``AdWindows.take_reviews``), billable, as the batch layer's
    ``review_clicks``."""

    rule_id: str
    reason: str
    factor: float
    baseline_hours: int
    min_clicks: int
    effective_from_ms: int | None = None
    exclude: bool = True
    kind: ClassVar[str] = CTR_SPIKE_KIND

    @property
    def params(self) -> CtrSpikeParams:
        return CtrSpikeParams(
            self.factor, self.baseline_hours, self.min_clicks, exclude=self.exclude
        )


AdRule = NoImpressionRule | CtrSpikeRule


@dataclass(frozen=True)
class AdRules:
    """The ad-keyed rules in force, in the rule set's order (the first that flags a click
    names it), as a recordable value (:meth:`to_json`)."""

    rules: tuple[AdRule, ...] = ()

    @classmethod
    def from_ruleset(cls, ruleset: RuleSet) -> AdRules:
        rules: list[AdRule] = []
        for compiled in ruleset.rules:
            spec = compiled.spec
            if not spec.enabled:
                continue
            if spec.kind == NO_IMPRESSION_KIND:
                p = params_of(spec, NoImpressionParams)
                rules.append(
                    NoImpressionRule(
                        spec.id,
                        spec.reason,
                        p.window_minutes,
                        p.min_ad_impressions,
                        spec.effective_from_ms,
                    )
                )
            elif spec.kind == CTR_SPIKE_KIND:
                c = params_of(spec, CtrSpikeParams)
                rules.append(
                    CtrSpikeRule(
                        spec.id,
                        spec.reason,
                        c.factor,
                        c.baseline_hours,
                        c.min_clicks,
                        spec.effective_from_ms,
                        exclude=c.exclude,
                    )
                )
        return cls(tuple(rules))

    @property
    def ids(self) -> list[str]:
        """The rules that correct the clicks they flag (not those only reporting them)."""
        return [rule.rule_id for rule in self.rules if not _review_only(rule)]

    @property
    def seen_ms(self) -> int:
        """How far before an undecided hour the impressions its verdicts need lie (0: no
        rule needs impressions, only their counts)."""
        return max(
            (r.lookback_ms for r in self.rules if isinstance(r, NoImpressionRule)), default=0
        )

    @property
    def counts_ms(self) -> int:
        """How far before an undecided hour the per-(ad, hour) counts its verdicts need lie."""
        return max(
            (r.baseline_hours * HOUR_MS for r in self.rules if isinstance(r, CtrSpikeRule)),
            default=24 * HOUR_MS,
        )

    def to_json(self) -> str:
        rules = [{"kind": rule.kind, **asdict(rule)} for rule in self.rules]
        return json.dumps({"rules": rules}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> AdRules:
        rules: list[AdRule] = []
        for fields in json.loads(text)["rules"]:
            kind = fields.pop("kind")
            if kind == NO_IMPRESSION_KIND:
                rules.append(NoImpressionRule(**fields))
            elif kind == CTR_SPIKE_KIND:
                rules.append(CtrSpikeRule(**fields))
            else:
                raise ValueError(f"ad rule {fields.get('rule_id')!r}: unknown kind {kind!r}")
        return cls(tuple(rules))


@dataclass
class AdWindows:
    """One ad-keyed partition's stage-2 state: a function of the records consumed and the
    rules, so replaying the log up to the committed offset, in any chunks, rebuilds it.

    ``decided_until_ms`` (a whole hour): every accepted click before it is decided, and no
    record before it is accepted any more. ``_kept``: the undecided hours' clicks, whole (a
    verdict carries its record); ``_counts``: clicks and impressions per (ad, hour) of every
    record accepted, for the baseline's day before the undecided hours; ``_seen``: while
    ``no_impression_click`` is in force, the impressions of its window before the undecided
    hours and of those hours, as (visitor, ad, time), complete from ``seen_from_ms`` (None:
    from the first record) on: the first time after every record accepted before it was
    kept, raised as older impressions are forgotten."""

    horizon_ms: int
    high_water: dict[int, int] = field(default_factory=dict)
    max_event_ms: int = 0
    decided_until_ms: int | None = None
    _kept: pl.DataFrame = field(default_factory=lambda: _STATE_SCHEMA.to_frame())
    _counts: pl.DataFrame = field(default_factory=lambda: _COUNTS_SCHEMA.to_frame())
    # Rows of ``_counts`` when it was last summed to one row per (ad, hour): each consume
    # appends its records' counts, summed again only once they have doubled or an hour is
    # judged, not the whole day's on every consume.
    _summed_rows: int = 0
    # Counted clicks of the hours decided since the last ``take_reviews``, per review-only
    # rule that flagged them (they stay billable: reported, not corrected).
    _reviews: dict[str, int] = field(default_factory=dict)
    _seen: pl.DataFrame | None = None  # None: impressions are not kept (no rule needs them)
    seen_from_ms: int | None = None
    # The counts are whole from this hour on (None: from the first record): raised as older
    # hours' counts are forgotten, so a baseline widened later does not reach before it.
    counts_from_ms: int | None = None
    # The records are complete from this event time on (None: from the log's start): the
    # latest context mark. Neither the impressions nor the counts are complete before it.
    context_from_ms: int | None = None

    def start_context(self, from_ms: int) -> None:
        """The records from here on follow a gap (stage 1 started while the stream ran, or
        the family's rules were off): the impressions and counts are complete from
        ``from_ms`` on only, so an hour whose window or baseline reaches into the gap is the
        batch's (a click whose impression fell in it would be flagged, a baseline would
        lack the gap's clicks)."""
        self.context_from_ms = later_bound(self.context_from_ms, from_ms)
        if self._seen is not None:
            self.seen_from_ms = later_bound(self.seen_from_ms, from_ms)
        self.counts_from_ms = later_bound(self.counts_from_ms, from_ms)

    def take_reviews(self) -> dict[str, int]:
        """The review-only rules' clicks of the hours decided since the last call: the
        stage commits them with the verdicts of the same consumes (and a recovery, which
        re-derives what was committed, drops them)."""
        reviews, self._reviews = self._reviews, {}
        return reviews

    def consume(self, records: pa.Table | pl.DataFrame, rules: AdRules) -> pa.Table:
        """Take records (``AD_RECORD_SCHEMA``) in log order; return the verdicts
        (``AD_VERDICT_SCHEMA``) on the counted clicks of the hours this consume decides."""
        batch = records if isinstance(records, pl.DataFrame) else pl.from_arrow(records)
        assert isinstance(batch, pl.DataFrame)
        if "keyed_offset" not in batch.columns:
            batch = batch.with_columns(pl.lit(None, pl.Int64).alias("keyed_offset"))
        self._keep_impressions(rules.seen_ms > 0)
        fresh, self.max_event_ms = accept(
            batch, self.high_water, max_event_ms=self.max_event_ms, horizon_ms=self.horizon_ms
        )
        if fresh.height:
            fresh = fresh.select(_STATE_SCHEMA.names()).cast(_STATE_SCHEMA)
            is_click = pl.col("event_type") == ids.CLICK
            self._kept = pl.concat([self._kept, fresh.filter(is_click)])
            if self._seen is not None:
                seen = fresh.filter(~is_click).select(_SEEN_SCHEMA.names())
                self._seen = pl.concat([self._seen, seen])
            added = ad_hour_counts(named_event_types(fresh)).cast(_COUNTS_SCHEMA)
            self._counts = pl.concat([self._counts, added])
            if self._counts.height > 2 * self._summed_rows:
                self._sum_counts()
        if not self.max_event_ms:
            return AD_VERDICT_SCHEMA.empty_table()  # no record accepted yet
        newest_closed = self.max_event_ms - self.horizon_ms
        until = newest_closed - newest_closed % HOUR_MS
        since = self.decided_until_ms
        if since is not None and until <= since:
            return AD_VERDICT_SCHEMA.empty_table()
        self.decided_until_ms = until
        self._sum_counts()
        if since is not None:
            start = since
        elif self._kept.height:
            first = self._kept.select(pl.col("ts_ms").min()).item()
            start = first - first % HOUR_MS
        else:
            start = until  # no click yet: no hour has a verdict or a review
        verdicts = [self._judge_hour(hour, rules) for hour in range(start, until, HOUR_MS)]
        self._forget(rules)
        return pa.concat_tables([AD_VERDICT_SCHEMA.empty_table(), *verdicts])

    def _keep_impressions(self, wanted: bool) -> None:
        """Start keeping impressions when a rule needs them (complete only for times after
        every record accepted so far: an earlier one may have been dropped), stop when none
        does."""
        if wanted and self._seen is None:
            self._seen = _SEEN_SCHEMA.to_frame()
            self.seen_from_ms = later_bound(
                self.max_event_ms + 1 if self.max_event_ms else None, self.context_from_ms
            )
        elif not wanted and self._seen is not None:
            self._seen, self.seen_from_ms = None, None

    def _judge_hour(self, hour_ms: int, rules: AdRules) -> pa.Table:
        """The verdicts on hour ``hour_ms``'s counted clicks, the first rule that flags a
        click naming it, each rule seeing what the batch gives it for that hour."""
        ts = pl.col("ts_ms")
        in_hour = self._kept.filter((ts >= hour_ms) & (ts < hour_ms + HOUR_MS))
        clicks = in_hour.filter(pl.col("counted"))
        if not clicks.height or not rules.rules:
            return AD_VERDICT_SCHEMA.empty_table()
        flagged = pl.DataFrame(
            schema={"event_id": pl.String, "rule_id": pl.String, "evidence": pl.String}
        )
        left = False  # a correcting rule before could not judge this hour in the stream
        for rule in rules.rules:
            if rule.effective_from_ms is not None and hour_ms + HOUR_MS <= rule.effective_from_ms:
                continue
            if left and not _review_only(rule):
                continue  # the batch may name that rule for any of these clicks
            if not self._can_judge(rule, hour_ms):
                # What it reads is not all here (it came into force, or reached further
                # back, while the stream ran): the batch judges this hour for it.
                left = left or not _review_only(rule)
                continue
            if isinstance(rule, NoImpressionRule):
                assert self._seen is not None  # kept while such a rule is in force
                lo = hour_ms - rule.lookback_ms
                seen = self._seen.filter((ts >= lo) & (ts < hour_ms + HOUR_MS))
                frame = pl.concat(
                    [
                        in_hour.select("visitor", "ad_id", "ts_ms", "event_id", "user_id", "ip"),
                        seen.with_columns(pl.lit("impression").alias("event_type")),
                    ],
                    how="diagonal",
                ).with_columns(pl.col("event_type").fill_null("click"))
                said = rule.evidence(frame)
                found = frame.select("event_id", "ts_ms", "event_type").with_columns(
                    said.alias("evidence")
                )
            else:
                lo = hour_ms - rule.baseline_hours * HOUR_MS
                counts = self._counts.filter(
                    (pl.col("_hour") >= lo) & (pl.col("_hour") <= hour_ms)
                ).sort("ad_id", "_hour")
                spikes = ctr_spikes(counts, rule.params).filter(pl.col("_hour") == hour_ms)
                found = (
                    in_hour.select("event_id", "ts_ms", "ad_id")
                    .join(
                        spikes.select("ad_id", pl.col("_evidence").alias("evidence")),
                        on="ad_id",
                        how="left",
                    )
                    .with_columns(pl.lit("click").alias("event_type"))
                )
            found = found.filter(
                pl.col("evidence").is_not_null()
                & (pl.col("event_type") == "click")
                & (ts >= hour_ms)
                & (ts < hour_ms + HOUR_MS)
            )
            if rule.effective_from_ms is not None:
                found = found.filter(ts >= rule.effective_from_ms)
            if _review_only(rule):
                reviewed = found.join(clicks, on="event_id", how="semi").height
                if reviewed:
                    self._reviews[rule.rule_id] = self._reviews.get(rule.rule_id, 0) + reviewed
                continue
            found = found.select(
                "event_id", pl.lit(rule.rule_id).alias("rule_id"), "evidence"
            ).join(flagged, on="event_id", how="anti")
            flagged = pl.concat([flagged, found])
        verdicts = clicks.with_row_index("_at").join(flagged, on="event_id").sort("_at")
        previous = pl.lit(None, pl.String).alias("previous_rule_id")
        return (
            verdicts.select(*AD_VERDICT_SCHEMA.names[:-1], previous)
            .to_arrow()
            .cast(AD_VERDICT_SCHEMA)
        )

    def _can_judge(self, rule: AdRule, hour_ms: int) -> bool:
        """Whether everything ``rule`` reads for ``hour_ms`` is in the state."""
        if isinstance(rule, NoImpressionRule):
            lo = hour_ms - rule.lookback_ms
            return self._seen is not None and (self.seen_from_ms is None or lo >= self.seen_from_ms)
        lo = hour_ms - rule.baseline_hours * HOUR_MS
        return self.counts_from_ms is None or lo >= self.counts_from_ms

    def _sum_counts(self) -> None:
        """One row per (ad, hour) in ``_counts`` (what ``ctr_spikes`` takes)."""
        if self._counts.height > self._summed_rows:
            sums = pl.col("_c").sum(), pl.col("_i").sum()
            self._counts = self._counts.group_by("ad_id", "_hour").agg(*sums)
            self._summed_rows = self._counts.height

    def kept(self) -> pl.DataFrame:
        """The undecided clicks (a snapshot saves them with :meth:`counts`, :meth:`seen`
        and the marks)."""
        return self._kept

    def counts(self) -> pl.DataFrame:
        return self._counts

    def seen(self) -> pl.DataFrame | None:
        """The impressions kept (None: none is, no rule in force needs them)."""
        return self._seen

    @classmethod
    def restore(
        cls,
        horizon_ms: int,
        *,
        high_water: dict[int, int],
        max_event_ms: int,
        decided_until_ms: int | None,
        kept: pl.DataFrame,
        counts: pl.DataFrame,
        seen: pl.DataFrame | None = None,
        seen_from_ms: int | None = None,
        counts_from_ms: int | None = None,
        context_from_ms: int | None = None,
    ) -> AdWindows:
        """``kept`` may also hold impressions and decided clicks (a snapshot of a build
        that kept every raw event of the lookback): its impressions become ``seen``,
        complete for that lookback."""
        kept = kept.select(_STATE_SCHEMA.names()).cast(_STATE_SCHEMA)
        impressions = kept.filter(pl.col("event_type") != ids.CLICK)
        if impressions.height and seen is None:
            seen, seen_from_ms = impressions.select(_SEEN_SCHEMA.names()), None
        kept = kept.filter(pl.col("event_type") == ids.CLICK)
        if decided_until_ms is not None:
            kept = kept.filter(pl.col("ts_ms") >= decided_until_ms)
        return cls(
            horizon_ms,
            high_water=dict(high_water),
            max_event_ms=max_event_ms,
            decided_until_ms=decided_until_ms,
            _kept=kept,
            _counts=counts.select(_COUNTS_SCHEMA.names()).cast(_COUNTS_SCHEMA),
            _seen=None if seen is None else seen.select(_SEEN_SCHEMA.names()).cast(_SEEN_SCHEMA),
            seen_from_ms=seen_from_ms,
            counts_from_ms=counts_from_ms,
            context_from_ms=context_from_ms,
        )

    def _forget(self, rules: AdRules) -> None:
        """Decided clicks, and impressions and counts no undecided hour's verdicts can
        reach."""
        if self.decided_until_ms is None:
            return
        ts = pl.col("ts_ms")
        if self._kept.height and self._kept["ts_ms"].min() < self.decided_until_ms:  # type: ignore[operator]
            self._kept = self._kept.filter(ts >= self.decided_until_ms)
        seen_from = self.decided_until_ms - rules.seen_ms
        seen = self._seen
        if seen is not None:
            if seen.height and seen["ts_ms"].min() < seen_from:  # type: ignore[operator]
                self._seen = seen.filter(ts >= seen_from)
            # complete from here on only: a window widened later must not reach before it
            if self.seen_from_ms is None or self.seen_from_ms < seen_from:
                self.seen_from_ms = seen_from
        counts_from = self.decided_until_ms - rules.counts_ms
        if self._counts.height and self._counts["_hour"].min() < counts_from:  # type: ignore[operator]
            self._counts = self._counts.filter(pl.col("_hour") >= counts_from)
            self._summed_rows = self._counts.height  # summed just before the judging
        if self.counts_from_ms is None or self.counts_from_ms < counts_from:
            self.counts_from_ms = counts_from
