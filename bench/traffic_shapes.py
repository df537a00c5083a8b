"""Traffic for the throughput benchmarks: a production-shaped stream and the legacy one.

``production``: 10,000 ads with Zipf popularity (s = 1 over ad rank), 1,000,000 users, 20
countries, 3 device classes with a few real user agents each, advertiser and campaign ids
derived from the ad (20 ads per campaign, 10 campaigns per advertiser), 1 click per 20
impressions (CTR varies per ad), a price on half of the clicks, 5 % exact retransmissions of
earlier events and 2 % events older than the allowed lateness, event times spread over 10
minutes ending at generation time. Built with numpy and polars column operations (no
per-event Python), NDJSON bodies sliced out of one Arrow buffer. Deterministic for a seed
and a ``now_ms``.

It also gives the ground truth: counted clicks and impressions per (ad, minute), derived
with polars from the generated columns alone (first copy of a (type, id) wins, an event
older than the running max event time minus the lateness is late), and checked against the
labels the generator meant.

Why the counts are exact whatever order the server reads the batches in (within bounds):
event time advances with the position in the stream (a 10-minute span over the events, up
to ``jitter_ms`` of delivery delay), a retransmission follows its original by at most
``retry_delay_max_ms`` of stream time, and a late event is at least ``late_margin_ms``
further behind than the lateness and is never within the first 256 lines of a body (so an
earlier event of the same body and partition already moved the watermark). A counted event
therefore stays on time as long as no event more than ``safe_reorder_ms`` of stream time
after it is read before it (:meth:`Traffic.reorder_note` checks the sender's window).

``legacy``: ``clickagg.traffic.TrafficGenerator`` as the figures before this shape used it
(50 ads, 5,000 users, ~10 % duplicates, 2 % late, 0.5 % malformed lines); no ground truth.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa

MINUTE_MS = 60_000
SHAPES = ("production", "legacy")

COUNTRIES = (
    ("US", 30), ("IN", 9), ("GB", 7), ("DE", 7), ("BR", 6), ("FR", 5), ("JP", 5),
    ("CA", 4), ("MX", 4), ("ID", 3), ("IT", 3), ("ES", 3), ("AU", 2), ("KR", 2),
    ("NL", 2), ("TR", 2), ("PL", 1), ("SE", 1), ("AR", 1), ("ZA", 1),
)  # fmt: skip
DEVICES: tuple[tuple[str, float, tuple[str, ...]], ...] = (
    (
        "mobile",
        0.60,
        (
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
            "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
            "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/124.0.0.0 Mobile Safari/537.36",
            "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
            "SamsungBrowser/25.0 Chrome/121.0.0.0 Mobile Safari/537.36",
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
            "(KHTML, like Gecko) CriOS/124.0.6367.88 Mobile/15E148 Safari/604.1",
        ),
    ),
    (
        "desktop",
        0.33,
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/124.0.0.0 Safari/537.36",
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like "
            "Gecko) Version/17.4 Safari/605.1.15",
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/124.0.0.0 Safari/537.36 Edg/124.0.2478.80",
            "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
        ),
    ),
    (
        "tablet",
        0.07,
        (
            "Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
            "Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
            "Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/124.0.0.0 Safari/537.36",
        ),
    ),
)
LATE_GUARD_LINES = 256  # a late event is never among the first lines of a body


@dataclass(frozen=True)
class Shape:
    ads: int = 10_000
    zipf_s: float = 1.0
    users: int = 1_000_000
    countries: int = 20
    devices: int = 3
    ads_per_campaign: int = 20
    campaigns_per_advertiser: int = 10
    duplicate_fraction: float = 0.05
    late_fraction: float = 0.02
    span_ms: int = 10 * MINUTE_MS
    impressions_per_click: float = 20.0
    priced_click_fraction: float = 0.5
    allowed_lateness_ms: int = 5 * MINUTE_MS  # the server's default
    jitter_ms: int = 5_000
    retry_delay_mean_ms: int = 2_000
    retry_delay_max_ms: int = 20_000
    late_margin_ms: int = 90_000
    late_max_behind_ms: int = 20 * MINUTE_MS

    def __post_init__(self) -> None:
        if not 1 <= self.countries <= len(COUNTRIES):
            raise ValueError(f"countries must be 1..{len(COUNTRIES)}")
        if not 1 <= self.devices <= len(DEVICES):
            raise ValueError(f"devices must be 1..{len(DEVICES)}")
        if self.ads < 1 or self.users < 1:
            raise ValueError("ads and users must be positive")

    @property
    def safe_reorder_ms(self) -> int:
        """How far ahead (stream time) reads may run before a counted event turns late."""
        return self.allowed_lateness_ms - self.jitter_ms - self.retry_delay_max_ms


@dataclass
class Traffic:
    """Pre-rendered bodies, plus (production) the columns and the expected outcome."""

    shape_name: str
    bodies: list[bytes]
    events: int
    batch: int
    description: str
    shape: Shape | None = None
    columns: pl.DataFrame | None = None  # stream order; production only
    truth: pl.DataFrame | None = None  # ad_id, minute_ms, clicks, impressions
    fates: dict[str, int] = field(default_factory=dict)  # expected counted/duplicate/late
    ad_ids: list[str] = field(default_factory=list)  # by popularity rank
    ad_weights: npt.NDArray[np.float64] | None = None

    def body_span_ms(self) -> float:
        """Stream time covered by one body."""
        if self.shape is None or not self.events:
            return float("nan")
        return self.shape.span_ms * min(self.batch, self.events) / self.events

    def reorder_note(self, bodies_in_flight: int) -> str | None:
        """A warning when the sender may read further ahead than the ground truth allows."""
        if self.shape is None:
            return None
        ahead = self.body_span_ms() * bodies_in_flight
        if ahead <= self.shape.safe_reorder_ms:
            return None
        return (
            f"{bodies_in_flight} bodies in flight cover {ahead / 1e3:.0f} s of event time, more "
            f"than the {self.shape.safe_reorder_ms / 1e3:.0f} s the ground truth tolerates: "
            f"send more events or smaller batches for an exact check"
        )

    def arrow_events(self) -> pa.Table:
        """ad_id, ts_ms, event_type of every line (production: all lines are valid)."""
        assert self.columns is not None
        return self.columns.select("ad_id", "ts_ms", "event_type").to_arrow()


def _splitmix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """A bijective 64-bit mix, for per-user attributes without a per-user table."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _unit(h: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _hex128(hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64]) -> pa.Array:
    """32 lower-case hex digits per row, as an Arrow string array."""
    raw = np.empty((len(hi), 2), dtype=">u8")
    raw[:, 0] = hi
    raw[:, 1] = lo
    nibbles = raw.view(np.uint8).reshape(-1, 16)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    out = np.empty((len(hi), 32), dtype=np.uint8)
    out[:, 0::2] = digits[nibbles >> 4]
    out[:, 1::2] = digits[nibbles & 15]
    fixed = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(32), len(hi), [None, pa.py_buffer(out.tobytes())]
    )
    return fixed.cast(pa.binary()).cast(pa.string())


def _take(values: list[str], index: npt.NDArray[np.int64]) -> pa.Array:
    return pa.array(values, pa.string()).take(pa.array(index, pa.int64()))


def zipf_weights(n: int, s: float) -> npt.NDArray[np.float64]:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return w / w.sum()


def production(
    events: int,
    batch: int,
    *,
    seed: int,
    shape: Shape | None = None,
    now_ms: int | None = None,
) -> Traffic:
    shape = shape or Shape()
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    rng = np.random.default_rng(seed)
    n = events
    n_dup = round(n * shape.duplicate_fraction)
    uniq = n - n_dup

    # -- the stream layout: unique events in order, retransmissions slotted in after them
    span_per_event = shape.span_ms / max(uniq, 1)
    originals = rng.choice(uniq, size=n_dup, replace=True) if uniq else np.zeros(0, np.int64)
    delay_ms = np.minimum(
        rng.exponential(shape.retry_delay_mean_ms, size=n_dup), shape.retry_delay_max_ms
    )
    delay_events = np.maximum(1.0, delay_ms / span_per_event)
    keys = np.concatenate([np.arange(uniq, dtype=np.float64), originals + delay_events + 0.5])
    order = np.argsort(keys, kind="stable")
    src = np.concatenate([np.arange(uniq), originals])[order]  # unique event of each line
    is_dup_line = order >= uniq
    position = np.empty(uniq, dtype=np.int64)
    position[src[~is_dup_line]] = np.flatnonzero(~is_dup_line)

    # -- late events: unique events never retransmitted, not at the head of a body
    retransmitted = np.zeros(uniq, dtype=np.bool_)
    retransmitted[originals] = True
    in_body = position % batch >= min(LATE_GUARD_LINES, batch // 4)
    eligible = np.flatnonzero(~retransmitted & in_body & (position >= LATE_GUARD_LINES))
    n_late = min(round(n * shape.late_fraction), len(eligible))
    late = np.zeros(uniq, dtype=np.bool_)
    late[rng.choice(eligible, size=n_late, replace=False)] = True

    # -- per unique event: time, ad, user, type
    end_ms = now_ms - 1_000
    start_ms = end_ms - shape.span_ms
    stream_ms = start_ms + (np.arange(uniq) * span_per_event).astype(np.int64)
    ts = stream_ms - rng.integers(0, shape.jitter_ms + 1, size=uniq)
    behind = rng.integers(
        shape.allowed_lateness_ms + shape.late_margin_ms,
        shape.late_max_behind_ms + 1,
        size=n_late,
    )
    ts[late] = stream_ms[late] - behind

    rank = rng.choice(shape.ads, size=uniq, p=zipf_weights(shape.ads, shape.zipf_s))
    ad_number = rng.permutation(shape.ads)  # popularity is not the id order
    ctr_scale = rng.uniform(0.5, 1.5, size=shape.ads)
    base_ctr = 1.0 / (1.0 + shape.impressions_per_click)
    is_click = rng.random(uniq) < np.minimum(base_ctr * ctr_scale[rank], 1.0)
    cpc = (np.exp(rng.normal(np.log(400_000), 0.6, size=shape.ads)) // 10_000 * 10_000).astype(
        np.int64
    ) + 10_000
    priced = is_click & (rng.random(uniq) < shape.priced_click_fraction)
    user = rng.integers(0, shape.users, size=uniq, dtype=np.uint64)
    h_user = _splitmix64(user ^ np.uint64(seed * 0x1000193 + 1))
    h_dev = _splitmix64(h_user)
    h_ua = _splitmix64(h_dev)

    country_w = np.array([w for _, w in COUNTRIES[: shape.countries]], dtype=np.float64)
    country = np.searchsorted(np.cumsum(country_w / country_w.sum()), _unit(h_user), "right")
    device_w = np.array([w for _, w, _ in DEVICES[: shape.devices]], dtype=np.float64)
    device = np.searchsorted(np.cumsum(device_w / device_w.sum()), _unit(h_dev), "right")
    device = np.minimum(device, shape.devices - 1)
    country = np.minimum(country, shape.countries - 1)
    ua_lists = [agents for _, _, agents in DEVICES[: shape.devices]]
    ua_table = [ua for agents in ua_lists for ua in agents]
    for ua in ua_table:
        assert json.dumps(ua)[1:-1] == ua, "user agents are embedded unescaped"
    ua_offset = np.cumsum([0, *(len(a) for a in ua_lists)])[:-1]
    ua_count = np.array([len(a) for a in ua_lists])
    ua_index = ua_offset[device] + (h_ua % ua_count[device].astype(np.uint64)).astype(np.int64)
    ip_int = (h_user >> np.uint64(32)).astype(np.int64)

    ids = _hex128(
        _splitmix64(np.arange(uniq, dtype=np.uint64) ^ np.uint64(seed << 40)),
        _splitmix64(np.arange(uniq, dtype=np.uint64) + np.uint64(seed * 7919 + 3)),
    )

    # -- lines: gather the unique events into stream order
    width = max(6, len(str(shape.ads - 1)))
    numbers = ad_number.tolist()
    per_campaign, per_advertiser = shape.ads_per_campaign, shape.campaigns_per_advertiser
    ad_by_rank = [f"ad-{num:0{width}d}" for num in numbers]
    campaign_by_rank = [f"cmp-{num // per_campaign:0{width - 1}d}" for num in numbers]
    advertiser_by_rank = [
        f"adv-{num // per_campaign // per_advertiser:0{width - 2}d}" for num in numbers
    ]
    line_rank = rank[src]
    ip = ip_int[src]
    cols = pl.DataFrame(
        {
            "line": np.arange(n, dtype=np.int64),
            "event_type": _take(["impression", "click"], is_click[src].astype(np.int64)),
            "event_id": ids.take(pa.array(src)),
            "ad_id": _take(ad_by_rank, line_rank),
            "campaign_id": _take(campaign_by_rank, line_rank),
            "advertiser_id": _take(advertiser_by_rank, line_rank),
            "user": user[src].astype(np.int64),
            "ts_ms": ts[src],
            "ip_a": 11 + ip % 200,
            "ip_b": (ip >> 8) % 256,
            "ip_c": (ip >> 16) % 256,
            "ip_d": (ip >> 24) % 254 + 1,
            "user_agent": _take(ua_table, ua_index[src]),
            "country": _take([c for c, _ in COUNTRIES], country[src]),
            "cost": np.where(priced[src], cpc[rank][src], -1),
            "label_duplicate": is_dup_line,
            "label_late": late[src] & ~is_dup_line,
        }
    ).with_columns(
        pl.when(pl.col("cost") >= 0).then(pl.col("cost")).alias("cost_micros"),
        pl.format("u-{}", pl.col("user")).alias("user_id"),
        pl.format("{}.{}.{}.{}", "ip_a", "ip_b", "ip_c", "ip_d").alias("ip"),
    )
    line = pl.concat_str(
        pl.lit('{"event_type":"'),
        "event_type",
        pl.lit('","event_id":"'),
        "event_id",
        pl.lit('","ad_id":"'),
        "ad_id",
        pl.lit('","campaign_id":"'),
        "campaign_id",
        pl.lit('","advertiser_id":"'),
        "advertiser_id",
        pl.lit('","user_id":"'),
        "user_id",
        pl.lit('","timestamp":'),
        pl.col("ts_ms").cast(pl.String),
        pl.lit(',"ip":"'),
        "ip",
        pl.lit('","user_agent":"'),
        "user_agent",
        pl.lit('","country":"'),
        "country",
        pl.lit('"'),
        pl.concat_str(pl.lit(',"cost_micros":'), pl.col("cost_micros").cast(pl.String)),
        pl.lit("}\n"),
        ignore_nulls=True,
    )
    text = cols.select(line.alias("line")).to_series().to_arrow()
    bodies = _slice_bodies(text, batch)
    columns = cols.select(
        "line",
        "event_type",
        "event_id",
        "ad_id",
        "campaign_id",
        "advertiser_id",
        "user_id",
        "ts_ms",
        "ip",
        "user_agent",
        "country",
        "cost_micros",
        "label_duplicate",
        "label_late",
    )
    truth, fates = ground_truth(columns, shape.allowed_lateness_ms)
    return Traffic(
        shape_name="production",
        bodies=bodies,
        events=n,
        batch=batch,
        description=(
            f"production: {shape.ads:,} ads (Zipf s={shape.zipf_s:g}), {shape.users:,} users, "
            f"{shape.countries} countries, {shape.devices} devices ({len(ua_table)} user "
            f"agents), {fates['duplicate']:,} duplicates, {fates['late']:,} late, event "
            f"times over {shape.span_ms / 60_000:g} min"
        ),
        shape=shape,
        columns=columns,
        truth=truth,
        fates=fates,
        ad_ids=ad_by_rank,
        ad_weights=zipf_weights(shape.ads, shape.zipf_s),
    )


def _slice_bodies(text: pa.ChunkedArray | pa.Array, batch: int) -> list[bytes]:
    """Bodies of ``batch`` lines, cut out of the one contiguous buffer of all lines."""
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
    text = text.cast(pa.large_string())
    _, offsets_buf, data_buf = text.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[text.offset : text.offset + len(text) + 1]
    data = memoryview(data_buf)
    cuts = [*range(0, len(text), batch), len(text)]
    return [bytes(data[offsets[a] : offsets[b]]) for a, b in itertools.pairwise(cuts)]


def ground_truth(columns: pl.DataFrame, lateness_ms: int) -> tuple[pl.DataFrame, dict[str, int]]:
    """Expected counted clicks and impressions per (ad, minute), from the lines alone.

    The first line of a (type, id) counts, a later copy is a duplicate; a line older than
    the running max event time minus the lateness is late. Checked against the labels the
    generator meant to produce.
    """
    fated = columns.sort("line").with_columns(
        (~pl.struct("event_type", "event_id").is_first_distinct()).alias("duplicate"),
        (pl.col("ts_ms") < pl.col("ts_ms").cum_max() - lateness_ms).alias("late_any"),
    )
    fated = fated.with_columns((pl.col("late_any") & ~pl.col("duplicate")).alias("late"))
    mismatch = fated.filter(
        (pl.col("duplicate") != pl.col("label_duplicate"))
        | (pl.col("late") != pl.col("label_late"))
    ).height
    if mismatch:
        raise AssertionError(f"{mismatch} lines whose derived fate differs from the generator's")
    counted = fated.filter(~pl.col("duplicate") & ~pl.col("late"))
    truth = (
        counted.group_by(
            "ad_id", (pl.col("ts_ms") - pl.col("ts_ms") % MINUTE_MS).alias("minute_ms")
        )
        .agg(
            (pl.col("event_type") == "click").sum().cast(pl.Int64).alias("clicks"),
            (pl.col("event_type") == "impression").sum().cast(pl.Int64).alias("impressions"),
        )
        .sort("ad_id", "minute_ms")
    )
    fates = {
        "counted": counted.height,
        "duplicate": int(fated["duplicate"].sum()),
        "late": int(fated["late"].sum()),
        "invalid": 0,
    }
    return truth, fates


def compare(truth: pl.DataFrame, measured: pl.DataFrame) -> dict[str, Any]:
    """Rows that differ between the expected and the stored (ad, minute) counts."""
    keys = ["ad_id", "minute_ms"]
    joined = truth.join(measured, on=keys, how="full", suffix="_got", coalesce=True).fill_null(0)
    diff = joined.filter(
        (pl.col("clicks") != pl.col("clicks_got"))
        | (pl.col("impressions") != pl.col("impressions_got"))
    )
    return {
        "rows_expected": truth.height,
        "rows_stored": measured.height,
        "rows_differing": diff.height,
        "clicks_expected": int(truth["clicks"].sum()),
        "clicks_stored": int(measured["clicks"].sum()),
        "impressions_expected": int(truth["impressions"].sum()),
        "impressions_stored": int(measured["impressions"].sum()),
        "first_differences": diff.head(5).to_dicts(),
    }


def click_fields(count: int, *, seed: int, shape: Shape | None = None) -> list[str]:
    """The fields of ``count`` production clicks as JSON object tails (``"ad_id":...}``),
    without id or time: a single-event load generator adds a unique ``click_id`` and the
    current time to each request."""
    traffic = production(count * 25, max(count * 25, 1), seed=seed, shape=shape)
    assert traffic.columns is not None
    clicks = traffic.columns.filter(
        (pl.col("event_type") == "click") & ~pl.col("label_duplicate") & ~pl.col("label_late")
    ).head(count)
    tail = pl.concat_str(
        pl.lit('"ad_id":"'),
        "ad_id",
        pl.lit('","campaign_id":"'),
        "campaign_id",
        pl.lit('","advertiser_id":"'),
        "advertiser_id",
        pl.lit('","user_id":"'),
        "user_id",
        pl.lit('","ip":"'),
        "ip",
        pl.lit('","user_agent":"'),
        "user_agent",
        pl.lit('","country":"'),
        "country",
        pl.lit('"'),
        pl.concat_str(pl.lit(',"cost_micros":'), pl.col("cost_micros").cast(pl.String)),
        pl.lit("}"),
        ignore_nulls=True,
    )
    return clicks.select(tail.alias("tail")).to_series().to_list()


# -- the legacy stream and the command line ---------------------------------------------------


def legacy(
    events: int, batch: int, *, seed: int, mix: Any = None, now_ms: int | None = None
) -> Traffic:
    from clickagg.traffic import TrafficGenerator, TrafficMix

    mix = mix or TrafficMix()
    gen = TrafficGenerator(seed=seed, mix=mix)
    now_ms = now_ms or int(time.time() * 1000)
    bodies = []
    left = events
    while left > 0:
        size = min(batch, left)
        bodies.append(gen.ndjson(size, now_ms))
        left -= size
    return Traffic(
        shape_name="legacy",
        bodies=bodies,
        events=events,
        batch=batch,
        description=(
            f"legacy: TrafficGenerator, {mix.ads} ads, {mix.users:,} users, "
            f"{mix.duplicate_rate:.0%} duplicates, {mix.late_rate:.0%} late, "
            f"{mix.malformed_rate:.1%} malformed"
        ),
        ad_ids=gen.ad_ids,
        ad_weights=np.full(len(gen.ad_ids), 1.0 / len(gen.ad_ids)),
    )


def add_arguments(parser: argparse.ArgumentParser, *, multi: bool = False) -> None:
    """--shape, --ads, --users for a bench script."""
    parser.add_argument(
        "--shape",
        default="production",
        help=(
            "traffic: production (default) or legacy"
            + ("; comma-separated to interleave both in one run" if multi else "")
        ),
    )
    parser.add_argument("--ads", type=int, default=None, help="production: ads (10,000)")
    parser.add_argument("--users", type=int, default=None, help="production: users (1,000,000)")


def shapes_of(args: argparse.Namespace, *, multi: bool = False) -> list[str]:
    names = [s.strip() for s in args.shape.split(",") if s.strip()]
    unknown = [s for s in names if s not in SHAPES]
    if unknown or not names or (len(names) > 1 and not multi):
        raise SystemExit(f"--shape: one of {', '.join(SHAPES)}" + (", or both" if multi else ""))
    return names


def shape_of(args: argparse.Namespace, **overrides: Any) -> Shape:
    given = {k: getattr(args, k) for k in ("ads", "users") if getattr(args, k, None) is not None}
    return dataclasses.replace(Shape(), **(given | overrides))


def build(
    name: str,
    args: argparse.Namespace,
    events: int,
    batch: int,
    *,
    seed: int,
    now_ms: int | None = None,
    legacy_mix: Any = None,
    **shape_overrides: Any,
) -> Traffic:
    if name == "legacy":
        return legacy(events, batch, seed=seed, mix=legacy_mix, now_ms=now_ms)
    return production(
        events, batch, seed=seed, shape=shape_of(args, **shape_overrides), now_ms=now_ms
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="generate traffic and print what it holds")
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=7)
    add_arguments(p)
    ns = p.parse_args()
    for shape_name in shapes_of(ns, multi=True):
        t0 = time.perf_counter()
        traffic = build(shape_name, ns, ns.events, ns.batch, seed=ns.seed)
        took = time.perf_counter() - t0
        size = sum(map(len, traffic.bodies))
        print(f"{traffic.description}")
        print(
            f"  {traffic.events:,} events in {len(traffic.bodies)} bodies, "
            f"{size / 1e6:,.0f} MB ({size / traffic.events:.0f} B/event), built in {took:.2f} s"
        )
        if traffic.truth is not None:
            print(f"  expected fates {traffic.fates}; {traffic.truth.height:,} (ad, minute) rows")
            first = traffic.bodies[0].split(b"\n", 1)[0].decode()
            print(f"  first line: {first}")
