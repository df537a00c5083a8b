"""A device farm: one device fingerprint (user agent and device) clicking one ad from many
addresses, each address clicking too little for the per-address rules to see it.

Keyed like the rules of :mod:`.behaviour` (the batch layer applies it, with a window of
earlier events as context) but on another key: (user agent, device, ad). A popular
browser's agent on a popular ad is shared by many honest addresses too, so its thresholds
depend on an ad's volume: it ships off (``builtin.toml`` says why).

The distinct addresses in a sliding window are counted without a per-window set: each click
keeps its address *present* from its time until the next click of the same address in the
group, or until the window has passed (whichever is first). The presence intervals of one
address do not overlap, so the distinct addresses at a time are the intervals begun by then
minus those ended by then: two binary searches per click over sorted numpy arrays, however
many clicks a window holds.
"""

from __future__ import annotations

import msgspec
import numpy as np
import polars as pl

from clickagg.core.rules.base import FrameMatcher, RuleSpec
from clickagg.core.rules.behaviour import CLICK, _positive, _scattered, _stamp
from clickagg.core.rules.registry import params_of, register_kind
from clickagg.core.rules.velocity import keyed
from clickagg.core.windows import HOUR_MS

AGENT_CHARS = 40
"""Evidence names the agent by its first characters (the whole one is on the event)."""

KEY = ("user_agent", "device", "ad_id")


class AgentSpreadParams(msgspec.Struct, forbid_unknown_fields=True):
    min_ips: int
    min_clicks: int
    window_hours: int = 24


def _short_agent() -> pl.Expr:
    agent = pl.col("user_agent")
    cut = agent.str.slice(0, AGENT_CHARS)
    return (
        pl.when(agent.str.len_chars() > AGENT_CHARS)
        .then(pl.concat_str(cut, pl.lit("...")))
        .otherwise(agent)
    )


def window_counts(
    group: np.ndarray, ts: np.ndarray, end: np.ndarray, window_ms: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per click, its group's clicks and distinct addresses in ``[ts - window_ms, ts]``.

    ``group`` and ``ts`` are sorted by (group, ts); ``end`` is when the click's address
    stops being present (exclusive): the next click of the address in the group, or
    ``ts + window_ms + 1``. Groups are kept apart by offsetting each one's times by a stride
    longer than any time plus the window."""
    if not len(ts):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    base = int(ts.min())
    stride = int(end.max()) - base + window_ms + 2
    offset = group.astype(np.int64) * stride - base
    start_key = ts + offset  # sorted: (group, ts)
    end_key = np.sort(end + offset)
    upto = np.searchsorted(start_key, start_key, side="right")  # equal times: one window
    clicks = upto - np.searchsorted(start_key, start_key - window_ms, side="left")
    # Each group has as many ends as starts, so the earlier groups' cancel out.
    ips = upto - np.searchsorted(end_key, start_key, side="right")
    return clicks, ips


def _presence_end(group: np.ndarray, ip: np.ndarray, ts: np.ndarray, window_ms: int) -> np.ndarray:
    """When each click's address stops being present in its group's windows (exclusive):
    at the address's next click in the group, or ``window_ms`` after the click, whichever
    is first. ``group`` and ``ts`` sorted by (group, ts)."""
    end = ts + window_ms + 1
    if len(ts) < 2:
        return end
    by_ip = np.lexsort((ip, group))  # stable: in time order within (group, address)
    same = group[by_ip][1:] == group[by_ip][:-1]
    same &= ip[by_ip][1:] == ip[by_ip][:-1]
    later, earlier = by_ip[1:][same], by_ip[:-1][same]  # stable: in time order
    end[earlier] = np.minimum(end[earlier], ts[later])
    return end


@register_kind("shared_agent_ad_spread")
def shared_agent_ad_spread(spec: RuleSpec) -> FrameMatcher:
    """A click on an ad by a (user agent, device) whose clicks on that ad in the
    ``window_hours`` up to and including it (a sliding window ending at each click; equal
    times share one window) came from at least ``min_ips`` distinct addresses and number
    at least ``min_clicks``. Every click of the group from the one that reaches both on is
    flagged while the window holds them; the earlier ones stay billable, since an hour is
    judged with the window before it as context and never with what follows. Clicks
    without a user agent, device, address or ad are not judged and not counted.
    Evidence: ``"agent <first 40 chars> device <d>: <n> IPs, <c> clicks on ad <ad> in the
    <h> h to <time>"``."""
    params = params_of(spec, AgentSpreadParams)
    _positive(
        spec,
        min_ips=params.min_ips,
        min_clicks=params.min_clicks,
        window_hours=params.window_hours,
    )
    window_ms = params.window_hours * HOUR_MS

    def match(frame: pl.DataFrame) -> pl.Series:
        known = pl.all_horizontal(pl.col(c).is_not_null() for c in (*KEY, "ip"))
        clicks = (
            frame.with_row_index("_row").filter(CLICK & known).select("_row", *KEY, "ip", "ts_ms")
        )
        # Categorical codes stand for the strings: sorting by them groups equal values.
        codes = clicks.select(pl.col(c).cast(pl.Categorical).to_physical() for c in (*KEY, "ip"))
        agent, device, ad, ip = (codes[c].to_numpy() for c in (*KEY, "ip"))
        ts = clicks["ts_ms"].to_numpy()
        order = np.lexsort((ts, ad, device, agent))
        agent, device, ad, ip, ts = agent[order], device[order], ad[order], ip[order], ts[order]
        changed = (agent[1:] != agent[:-1]) | (device[1:] != device[:-1]) | (ad[1:] != ad[:-1])
        group = np.concatenate([[0], np.cumsum(changed)]) if len(ts) else ts
        n_clicks, n_ips = window_counts(
            group, ts, _presence_end(group, ip, ts, window_ms), window_ms
        )
        reached = (n_ips >= params.min_ips) & (n_clicks >= params.min_clicks)
        hit = clicks[order[reached]].with_columns(
            pl.Series("_clicks", n_clicks[reached]), pl.Series("_ips", n_ips[reached])
        )
        evidence = hit.select(
            pl.concat_str(
                pl.lit("agent "),
                _short_agent(),
                pl.lit(" device "),
                pl.col("device"),
                pl.lit(": "),
                pl.col("_ips").cast(pl.String),
                pl.lit(" IPs, "),
                pl.col("_clicks").cast(pl.String),
                pl.lit(" clicks on ad "),
                pl.col("ad_id"),
                pl.lit(f" in the {params.window_hours} h to "),
                _stamp("ts_ms"),
            )
        ).to_series()
        return _scattered(frame.height, hit["_row"], evidence)

    return FrameMatcher(match, lookback_ms=window_ms)


keyed("shared_agent_ad_spread")
