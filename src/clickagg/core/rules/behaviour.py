"""Behavioural (sophisticated) invalid traffic beyond per-IP velocity: repeat clicks, one
address spreading clicks over many ads or clicking steadily for hours, clicks without an
impression, an ad's CTR spiking.

Each is *keyed* (:mod:`.velocity`): its verdict on a click depends on other events of the
same user, address or ad, which the stream's partitions split, so the batch layer applies
them (and, for ``ip_ad_spread``, keyed by the address alone, the stream's keyed stage too:
``clickagg.core.keyed``). Each is a :class:`~clickagg.core.rules.base.FrameMatcher`: it
sees impressions too and declares the lookback of earlier events it needs, which the batch
layer supplies across the hour boundary (a repeat click at ``:00:05`` of one at ``:59:55``).

A *visitor* is the user (``user_id``), or where the event has none, the address and user
agent together (``ip`` + ``user_agent``); an event with neither is not judged by the rules
that key on visitors. Everything here is column operations (polars, numpy): no per-event
Python.
"""

from __future__ import annotations

import msgspec
import numpy as np
import polars as pl

from clickagg.core.rules.base import MAX_EVIDENCE_CHARS, FrameMatcher, RuleError, RuleSpec, nulls
from clickagg.core.rules.registry import params_of, register_kind
from clickagg.core.rules.velocity import MINUTE_MS, keyed
from clickagg.core.windows import HOUR_MS

CLICK = pl.col("event_type") == "click"
IMPRESSION = pl.col("event_type") == "impression"


def visitor_key() -> pl.Expr:
    """The key of a visitor (null: unknown), ``u:<user>`` or ``a:<ip> <agent>``."""
    by_address = pl.concat_str(pl.lit("a:"), pl.col("ip"), pl.lit(" "), pl.col("user_agent"))
    return (
        pl.when(pl.col("user_id").is_not_null())
        .then(pl.concat_str(pl.lit("u:"), pl.col("user_id")))
        .otherwise(by_address)
    )


def _visitor_label() -> pl.Expr:
    """How evidence names a visitor: the user, or the address (the agent is too long)."""
    return (
        pl.when(pl.col("user_id").is_not_null())
        .then(pl.concat_str(pl.lit("user "), pl.col("user_id")))
        .otherwise(pl.concat_str(pl.lit("ip "), pl.col("ip"), pl.lit(" (no user)")))
    )


def _stamp(column: str) -> pl.Expr:
    return pl.from_epoch(column, time_unit="ms").dt.strftime("%Y-%m-%dT%H:%M:%S%.3fZ")


def _scattered(height: int, rows: pl.Series, evidence: pl.Series) -> pl.Series:
    """Evidence for the given rows of a frame of ``height`` rows, null elsewhere."""
    out = nulls("evidence", height)
    if rows.len():
        out = out.scatter(rows, evidence.cast(pl.String).str.slice(0, MAX_EVIDENCE_CHARS))
    return out


def _positive(spec: RuleSpec, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise RuleError(f"rule {spec.id!r} ({spec.kind}): params: {name} must be > 0")


# -- repeat clicks -----------------------------------------------------------------------------


class RepeatParams(msgspec.Struct, forbid_unknown_fields=True):
    window_seconds: int


def anchored(group: np.ndarray, ts: np.ndarray, window_ms: int) -> np.ndarray:
    """Which events of each group are *anchors*: the first, then the first at least
    ``window_ms`` after the previous anchor, and so on. ``group`` and ``ts`` are sorted by
    (group, ts). Each event's next anchor candidate is found by one search; the chain from
    each group's first event is followed by pointer doubling: log2(longest chain) steps."""
    n = len(ts)
    if not n:
        return np.zeros(0, dtype=np.bool_)
    rel = ts - ts.min()
    stride = int(rel.max()) + window_ms + 1  # a group's keys never reach the next group's
    key = group.astype(np.int64) * stride + rel
    found = np.searchsorted(key, key + window_ms, side="left")
    same = found < n
    same[same] = group[found[same]] == group[same]
    jump = np.append(np.where(same, found, n), n)  # n: the end of the chain
    anchor = np.zeros(n + 1, dtype=np.bool_)
    anchor[np.flatnonzero(np.r_[True, group[1:] != group[:-1]])] = True
    while True:
        anchor[jump[np.flatnonzero(anchor)]] = True
        if (jump == n).all():
            break
        jump = jump[jump]
    return anchor[:n]


def repeat_evidence(
    frame: pl.DataFrame, window_ms: int, *, phase: str | None = None, key: str | None = None
) -> pl.Series:
    """``repeat_click``'s verdicts on a frame (evidence per row, null: not a repeat).

    ``phase``: a column whose values start chains of their own, as if each value's rows
    were a frame alone. The stream's visitor-keyed stage judges several hours in one call
    this way, each hour's clicks with the context the batch gives that hour.

    ``key``: a column holding each row's visitor key already (``visitor_key``): the stream
    stands a chain's counted click in for the clicks before it with only its key, ad and
    time (a row no later click precedes, so never a repeat and never named)."""
    ties = ["event_id"] if "event_id" in frame.columns else []
    phases = [phase] if phase is not None else []
    clicks = (
        frame.with_row_index("_row")
        .filter(CLICK)
        .select(
            "_row",
            *phases,
            (pl.col(key) if key is not None else visitor_key()).alias("_key"),
            _visitor_label().alias("_who"),
            "ad_id",
            "ts_ms",
            *ties,
        )
        .filter(pl.col("_key").is_not_null() & pl.col("ad_id").is_not_null())
        .sort(*phases, "_key", "ad_id", "ts_ms", *ties, maintain_order=True)
    )
    changed = pl.lit(False)
    for key in [*phases, "_key", "ad_id"]:
        changed = changed | (pl.col(key) != pl.col(key).shift())
    clicks = clicks.with_columns(changed.fill_null(True).cum_sum().alias("_group"))
    ts = clicks["ts_ms"].to_numpy()
    is_anchor = anchored(clicks["_group"].to_numpy(), ts, window_ms)
    position = np.arange(len(ts))
    last_anchor = np.maximum.accumulate(np.where(is_anchor, position, 0))
    repeats = clicks.with_columns(
        pl.Series("_anchor_ts", ts[last_anchor] if len(ts) else ts),
        pl.Series("_repeat", ~is_anchor),
    ).filter(pl.col("_repeat"))
    evidence = repeats.select(
        pl.concat_str(
            pl.col("_who"),
            pl.lit(" clicked ad "),
            pl.col("ad_id"),
            pl.lit(" again "),
            ((pl.col("ts_ms") - pl.col("_anchor_ts")) / 1000).round(3).cast(pl.String),
            pl.lit(" s after its counted click at "),
            _stamp("_anchor_ts"),
        )
    ).to_series()
    return _scattered(frame.height, repeats["_row"], evidence)


@register_kind("repeat_click")
def repeat_click(spec: RuleSpec) -> FrameMatcher:
    """The 2nd and later clicks of one visitor on one ad within ``window_seconds`` of the
    previous *counted* one: the first click stays billable, and so does the first after the
    window has passed since it (``ts - counted < window``: a repeat). Evidence:
    ``"<visitor> clicked ad <ad> again <s> s after its counted click at <time>"``.

    Context: the chain of counted clicks starts at the first click within the lookback
    (``max(window, 1 h)`` before the hour); a visitor that never pauses a whole window for
    that long may be counted in another phase than over all time.

    Clicks of equal time are taken in event id order where the frame has ids (the archive's
    do): which of two simultaneous clicks is the counted one then depends on the clicks
    alone, not on the log order the archive holds them in, which the number of partitions
    changes (the stream's visitor-keyed stage, ``clickagg.core.visitor``, decides the
    same)."""
    params = params_of(spec, RepeatParams)
    _positive(spec, window_seconds=params.window_seconds)
    window_ms = params.window_seconds * 1000

    def match(frame: pl.DataFrame) -> pl.Series:
        return repeat_evidence(frame, window_ms)

    return FrameMatcher(match, lookback_ms=max(window_ms, HOUR_MS))


def _sliding_per_ip(
    frame: pl.DataFrame,
    window_ms: int,
    measure: pl.Expr,
    limit: int,
    what: str,
    *,
    with_ad: bool,
) -> pl.Series:
    """Flag each click whose address's ``measure`` over the ``window_ms`` up to and
    including it (a sliding window ending at each click; equal times share one window) is
    above ``limit``. Evidence: ``"ip <ip>: <measure><what><time>"``. ``with_ad``: only
    clicks that name an ad take part."""
    taking = CLICK & pl.col("ip").is_not_null()
    if with_ad:
        taking &= pl.col("ad_id").is_not_null()
    clicks = (
        frame.with_row_index("_row")
        .filter(taking)
        .select("_row", "ip", "ad_id", "ts_ms")
        .sort("ip", "ts_ms", maintain_order=True)
    )
    windowed = (
        clicks.rolling(index_column="ts_ms", period=f"{window_ms}i", closed="both", group_by="ip")
        .agg(measure.alias("_n"))
        .unique(["ip", "ts_ms"])  # equal times share one window
    )
    # Joined, not set by position: ``rolling`` returns its groups in an order of its own.
    counted = clicks.join(windowed, on=["ip", "ts_ms"], how="left").filter(pl.col("_n") > limit)
    evidence = counted.select(
        pl.concat_str(
            pl.lit("ip "),
            pl.col("ip"),
            pl.lit(": "),
            pl.col("_n").cast(pl.String),
            pl.lit(what),
            _stamp("ts_ms"),
        )
    ).to_series()
    return _scattered(frame.height, counted["_row"], evidence)


# -- one address, many ads ---------------------------------------------------------------------


class SpreadParams(msgspec.Struct, forbid_unknown_fields=True):
    max_ads: int
    window_minutes: int


@register_kind("ip_ad_spread")
def ip_ad_spread(spec: RuleSpec) -> FrameMatcher:
    """A click from an address that clicked more than ``max_ads`` distinct ads in the
    ``window_minutes`` up to and including it (a sliding window ending at each click).
    Evidence: ``"ip <ip>: <n> distinct ads clicked in the <m> min to <time>"``."""
    params = params_of(spec, SpreadParams)
    _positive(spec, max_ads=params.max_ads, window_minutes=params.window_minutes)
    window_ms = params.window_minutes * MINUTE_MS

    def match(frame: pl.DataFrame) -> pl.Series:
        return _sliding_per_ip(
            frame,
            window_ms,
            pl.col("ad_id").n_unique(),
            params.max_ads,
            f" distinct ads clicked in the {params.window_minutes} min to ",
            with_ad=True,
        )

    return FrameMatcher(match, lookback_ms=window_ms)


# -- one address's volume over hours ------------------------------------------------------------


class VolumeParams(msgspec.Struct, forbid_unknown_fields=True):
    max_clicks: int
    window_hours: int


@register_kind("ip_click_volume")
def ip_click_volume(spec: RuleSpec) -> FrameMatcher:
    """A click from an address with more than ``max_clicks`` clicks in the
    ``window_hours`` up to and including it (sliding): steady volume a per-minute burst
    limit does not see, judged over up to a day of context. Evidence: ``"ip <ip>: <n>
    clicks in the <h> h to <time>"``."""
    params = params_of(spec, VolumeParams)
    _positive(spec, max_clicks=params.max_clicks, window_hours=params.window_hours)
    window_ms = params.window_hours * HOUR_MS

    def match(frame: pl.DataFrame) -> pl.Series:
        return _sliding_per_ip(
            frame,
            window_ms,
            pl.len(),
            params.max_clicks,
            f" clicks in the {params.window_hours} h to ",
            with_ad=False,
        )

    return FrameMatcher(match, lookback_ms=window_ms)


# -- clicks without an impression ---------------------------------------------------------------


class NoImpressionParams(msgspec.Struct, forbid_unknown_fields=True):
    window_minutes: int
    min_ad_impressions: int = 1


@register_kind("no_impression_click")
def no_impression_click(spec: RuleSpec) -> FrameMatcher:
    """A click by a visitor with no impression of that ad by the same visitor in the
    ``window_minutes`` before it (an impression at the click's own time counts). Only for
    ads with at least ``min_ad_impressions`` impressions among the events the rule sees
    (its lookback and the hour): traffic whose impressions are not sent is not judged.
    Evidence: ``"<visitor>: no impression of ad <ad> in the <m> min before"`` and the time
    of the visitor's last impression of it, if any."""
    params = params_of(spec, NoImpressionParams)
    _positive(
        spec, window_minutes=params.window_minutes, min_ad_impressions=params.min_ad_impressions
    )
    window_ms = params.window_minutes * MINUTE_MS

    def match(frame: pl.DataFrame) -> pl.Series:
        return no_impression_evidence(frame, params.window_minutes, params.min_ad_impressions)

    return FrameMatcher(match, lookback_ms=window_ms)


def no_impression_evidence(
    frame: pl.DataFrame, window_minutes: int, min_ad_impressions: int, *, key: str | None = None
) -> pl.Series:
    """``no_impression_click``'s verdicts on a frame (evidence per row, null: not flagged).

    ``key``: a column holding each row's visitor key already (``visitor_key``): the stream
    keeps an impression as its key, ad and time only (never flagged, never named)."""
    window_ms = window_minutes * MINUTE_MS
    keyed_frame = frame.with_row_index("_row").with_columns(
        (pl.col(key) if key is not None else visitor_key()).alias("_key")
    )
    impressions = keyed_frame.filter(IMPRESSION & pl.col("ad_id").is_not_null())
    per_ad = impressions.group_by("ad_id").agg(pl.len().alias("_ad_impressions"))
    seen = (
        impressions.filter(pl.col("_key").is_not_null())
        .select("_key", "ad_id", pl.col("ts_ms").alias("_seen_ms"))
        .sort("_seen_ms")
    )
    clicks = (
        keyed_frame.filter(CLICK & pl.col("_key").is_not_null())
        .select("_row", "_key", _visitor_label().alias("_who"), "ad_id", "ts_ms")
        .join(per_ad, on="ad_id", how="inner")
        .filter(pl.col("_ad_impressions") >= min_ad_impressions)
        .sort("ts_ms")
    )
    last = clicks.join_asof(
        seen,
        left_on="ts_ms",
        right_on="_seen_ms",
        by=["_key", "ad_id"],
        strategy="backward",
        check_sortedness=False,  # both sorted by time above; polars cannot tell with `by`
    )
    unseen = last.filter(
        pl.col("_seen_ms").is_null() | (pl.col("ts_ms") - pl.col("_seen_ms") > window_ms)
    )
    before = pl.concat_str(pl.lit(" (last at "), _stamp("_seen_ms"), pl.lit(")"))
    evidence = unseen.select(
        pl.concat_str(
            pl.col("_who"),
            pl.lit(": no impression of ad "),
            pl.col("ad_id"),
            pl.lit(f" in the {window_minutes} min before"),
            before.fill_null(""),
        )
    ).to_series()
    return _scattered(frame.height, unseen["_row"], evidence)


# -- an ad's CTR far above its own baseline ----------------------------------------------------


class CtrSpikeParams(msgspec.Struct, forbid_unknown_fields=True):
    factor: float
    baseline_hours: int
    min_clicks: int
    exclude: bool = False


_HOUR = (pl.col("ts_ms") - pl.col("ts_ms") % HOUR_MS).alias("_hour")


def ad_hour_counts(frame: pl.DataFrame) -> pl.DataFrame:
    """Clicks (``_c``) and impressions (``_i``) per ad and UTC hour (``_hour``) of the events
    given: what ``ctr_spike`` judges. The stream's ad-keyed stage keeps these counts, not the
    events, for the baseline's day (``clickagg.core.adkeyed``)."""
    return (
        frame.filter(pl.col("ad_id").is_not_null())
        .group_by("ad_id", _HOUR)
        .agg(CLICK.sum().alias("_c"), IMPRESSION.sum().alias("_i"))
        .sort("ad_id", "_hour")
    )


def ctr_spikes(counts: pl.DataFrame, params: CtrSpikeParams) -> pl.DataFrame:
    """The (``ad_id``, ``_hour``) of ``counts`` (:func:`ad_hour_counts`, sorted by ad and
    hour) whose CTR is a spike against the ad's baseline in ``counts``, with the evidence
    (``_evidence``). One definition for both layers: the batch counts its frame, the stream
    hands its kept counts."""
    baseline = counts.rolling(
        index_column="_hour",
        period=f"{params.baseline_hours * HOUR_MS}i",
        closed="left",
        group_by="ad_id",
    ).agg(pl.col("_c").sum().alias("_bc"), pl.col("_i").sum().alias("_bi"))
    c, i = pl.col("_c").cast(pl.Float64), pl.col("_i").cast(pl.Float64)
    bc, bi = pl.col("_bc").cast(pl.Float64) + 1, pl.col("_bi").cast(pl.Float64)
    spikes = counts.join(baseline, on=["ad_id", "_hour"], how="left").filter(
        (pl.col("_c") >= params.min_clicks)
        & (pl.col("_bi") > 0)
        & (c * bi > params.factor * bc * i)
    )
    return spikes.select(
        "ad_id",
        "_hour",
        pl.concat_str(
            pl.lit("ad "),
            pl.col("ad_id"),
            pl.lit(" hour "),
            pl.from_epoch("_hour", time_unit="ms").dt.strftime("%Y-%m-%dT%HZ"),
            pl.lit(": CTR "),
            pl.col("_c").cast(pl.String),
            pl.lit(" clicks / "),
            pl.col("_i").cast(pl.String),
            pl.lit(" impressions vs baseline "),
            pl.col("_bc").cast(pl.String),
            pl.lit(" / "),
            pl.col("_bi").cast(pl.String),
            pl.lit(f" over {params.baseline_hours} h (factor {params.factor:g})"),
        ).alias("_evidence"),
    )


@register_kind("ctr_spike")
def ctr_spike(spec: RuleSpec) -> FrameMatcher:
    """Every click of an ad in a UTC hour whose CTR (clicks / impressions, every event the
    rule sees) is above ``factor`` x the ad's CTR over the ``baseline_hours`` hours before,
    with at least ``min_clicks`` clicks in the hour. The baseline counts one click more than
    it saw, so a thin baseline with no clicks yet is not a CTR of zero that any click
    exceeds. An ad without impressions in the baseline has none and is not judged; an hour
    without impressions but with a baseline is above any. ``exclude = false`` (default): the
    clicks are reported for review and stay billable; ``true``: they are invalid.
    Evidence: ``"ad <ad> hour <hour>: CTR <c> clicks / <i> impressions vs baseline <bc> /
    <bi> over <n> h (factor <f>)"`` (``bc`` as seen)."""
    params = params_of(spec, CtrSpikeParams)
    _positive(
        spec,
        factor=params.factor,
        baseline_hours=params.baseline_hours,
        min_clicks=params.min_clicks,
    )

    def match(frame: pl.DataFrame) -> pl.Series:
        spikes = ctr_spikes(ad_hour_counts(frame), params)
        flagged = (
            frame.with_row_index("_row")
            .filter(CLICK)
            .select("_row", "ad_id", _HOUR)
            .join(spikes, on=["ad_id", "_hour"], how="inner")
        )
        return _scattered(frame.height, flagged["_row"], flagged["_evidence"])

    return FrameMatcher(
        match, lookback_ms=params.baseline_hours * HOUR_MS, review_only=not params.exclude
    )


for _kind in (
    "repeat_click",
    "ip_ad_spread",
    "ip_click_volume",
    "no_impression_click",
    "ctr_spike",
):
    keyed(_kind)
