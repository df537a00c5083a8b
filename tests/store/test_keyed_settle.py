"""Both keyed families' verdicts settled in the store's fenced transaction: a click flagged
by an IP-keyed rule and by ``repeat_click`` is corrected once, named by the earlier rule of
the rule set, whichever family commits first; what was applied is recorded for recovery."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from clickagg.core import aggregate
from clickagg.core.adkeyed import AD_VERDICT_SCHEMA
from clickagg.core.keyed import VERDICT_SCHEMA
from clickagg.core.visitor import VISITOR_VERDICT_SCHEMA
from clickagg.store.base import FencedError, KeyedCommit, PartitionCommit
from clickagg.store.duckdb_store import DuckDBStore

MINUTE = 1_700_000_040_000 - 1_700_000_040_000 % 60_000
ORDER = ("ip-ad-spread", "repeat-click", "ip-velocity")  # the built-ins' order


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DuckDBStore]:
    with DuckDBStore(tmp_path / "s.duckdb") as s:
        s.commit(_counted(["e1", "e2"]))
        yield s


def _counted(events: list[str]) -> PartitionCommit:
    """Stage 1 counted the events: one click each on ad ``ad``, 500 spend each."""
    n = len(events)
    row = {"ad_id": "ad", "minute_ms": MINUTE, "clicks": n, "impressions": 0}
    row |= {"spend_micros": 500 * n, "invalid_clicks": 0, "users": None}
    minute = pa.Table.from_pylist(
        [{**row, "advertiser_id": "adv", "campaign_id": "camp"}], schema=aggregate.MINUTE_SCHEMA
    )
    return PartitionCommit(
        partition=0,
        from_offset=0,
        to_offset=n,
        minute_deltas=minute,
        dimension_deltas=aggregate.empty_dimension_deltas(),
        max_event_ms=MINUTE,
        watermark_ms=0,
        counted=n,
        duplicates=0,
        late=0,
        invalid=0,
        committed_at_ms=0,
    )


def _verdicts(
    schema: pa.Schema, flagged: list[tuple[str, str]], previous: dict[int, str] | None = None
) -> pa.Table:
    """One verdict per (event id, rule); ``previous`` gives the family's own earlier rule
    of the verdict at that position (what its windows say the click stood under)."""
    rows = []
    for offset, (event_id, rule) in enumerate(flagged):
        rows.append(
            {
                "visitor": "u:u1",
                "ip": "203.0.113.7",
                "user_id": "u1",
                "user_agent": None,
                "ad_id": "ad",
                "advertiser_id": "adv",
                "campaign_id": "camp",
                "country": "US",
                "device": None,
                "browser": None,
                "ts_ms": MINUTE + 1_000,
                "event_id": event_id,
                "source_partition": 0,
                "source_offset": int(event_id[1:]),
                "spend_micros": 500,
                "counted": True,
                "keyed_offset": offset,
                "rule_id": rule,
                "evidence": f"{rule} saw it",
                "previous_rule_id": (previous or {}).get(offset),
            }
        )
    return pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema=schema)


def _commit(
    family: str,
    flagged: list[tuple[str, str]],
    *,
    lo: int = 0,
    k: int = 0,
    previous: dict[int, str] | None = None,
) -> KeyedCommit:
    schema = {"ip": VERDICT_SCHEMA, "ad": AD_VERDICT_SCHEMA}.get(family, VISITOR_VERDICT_SCHEMA)
    return KeyedCommit(
        keyed_partition=k,
        from_offset=lo,
        to_offset=lo + max(1, len(flagged)),
        high_water={0: 9},
        minute_deltas=aggregate.MINUTE_SCHEMA.empty_table(),
        dimension_deltas=aggregate.empty_dimension_deltas(),
        corrections=0,
        committed_at_ms=0,
        family=family,
        verdicts=_verdicts(schema, flagged, previous),
        rule_order=ORDER,
        spec_json=family,
    )


def _state(store: DuckDBStore) -> tuple[int, int, int, dict[str, int]]:
    totals = store.totals(ad_id="ad", start_ms=MINUTE, end_ms=MINUTE + 60_000)
    reasons = store.aggregates(
        ad_id="ad",
        start_ms=MINUTE,
        end_ms=MINUTE + 60_000,
        granularity="minute",
        group_by="invalid_reason",
    )
    breakdown = {r.group: r.invalid_clicks for r in reasons if r.invalid_clicks}
    return totals.clicks, totals.invalid_clicks, totals.spend_micros, breakdown


def _applied(store: DuckDBStore, family: str) -> list[tuple[str, str, str | None]]:
    table = store.keyed_applied(family, 0, 0).select(["event_id", "rule_id", "previous_rule_id"])
    return list(zip(*(table[c].to_pylist() for c in table.column_names), strict=True))


@pytest.mark.parametrize("together", [False, True])
@pytest.mark.parametrize("visitor_first", [False, True])
def test_a_click_both_families_flag_is_corrected_once_by_the_earlier_rule(
    store: DuckDBStore, visitor_first: bool, together: bool
) -> None:
    """One commit each, or both in one (the worker's): settled in the commits' order."""
    ip = _commit("ip", [("e1", "ip-ad-spread")])
    visitor = _commit("visitor", [("e1", "repeat-click")])
    first, second = (visitor, ip) if visitor_first else (ip, visitor)
    if together:
        applied_first, applied_second = store.commit_keyed([first, second])
    else:
        [applied_first] = store.commit_keyed([first])
        [applied_second] = store.commit_keyed([second])

    assert _state(store) == (1, 1, 500, {"ip-ad-spread": 1})
    assert applied_first["rule_id"].to_pylist() == [first.verdicts["rule_id"][0].as_py()]
    assert applied_first["previous_rule_id"].to_pylist() == [None]
    if visitor_first:  # the earlier rule came second: the reason moves, counts untouched
        assert applied_second["rule_id"].to_pylist() == ["ip-ad-spread"]
        assert applied_second["previous_rule_id"].to_pylist() == ["repeat-click"]
        assert _applied(store, "ip") == [("e1", "ip-ad-spread", "repeat-click")]
        assert store.keyed_corrections_by_rule() == {"repeat-click": 1}
    else:  # the later rule came second: nothing to do
        assert applied_second.num_rows == 0
        assert _applied(store, "visitor") == []
        assert store.keyed_corrections_by_rule() == {"ip-ad-spread": 1}
    assert store.keyed_progress("ip")[0].consumed_offset == 1
    assert store.keyed_progress("visitor")[0].consumed_offset == 1


@pytest.mark.parametrize("visitor_first", [False, True])
def test_a_rule_between_the_families_rules_names_the_click_in_either_order(
    store: DuckDBStore, visitor_first: bool
) -> None:
    """velocity (last) and repeat-click: repeat-click names it. Then spread (first) too."""
    ip = _commit("ip", [("e1", "ip-velocity"), ("e2", "ip-velocity")])
    visitor = _commit("visitor", [("e1", "repeat-click")])
    commits = [visitor, ip] if visitor_first else [ip, visitor]
    for c in commits:
        store.commit_keyed([c])
    assert _state(store) == (0, 2, 0, {"repeat-click": 1, "ip-velocity": 1})
    # A later read of the IP family, where spread now flags e1 (within the family it moves
    # from velocity; in the store from repeat-click, the rule it stands under).
    [moved] = store.commit_keyed([_commit("ip", [("e1", "ip-ad-spread")], lo=2)])
    assert moved["previous_rule_id"].to_pylist() == ["repeat-click"]
    assert _state(store) == (0, 2, 0, {"ip-ad-spread": 1, "ip-velocity": 1})


def test_several_verdicts_on_one_click_in_one_commit_settle_in_order(store: DuckDBStore) -> None:
    [applied] = store.commit_keyed(
        [_commit("ip", [("e1", "ip-velocity"), ("e1", "ip-ad-spread"), ("e1", "ip-velocity")])]
    )
    moves = zip(
        applied["rule_id"].to_pylist(), applied["previous_rule_id"].to_pylist(), strict=True
    )
    assert list(moves) == [
        ("ip-velocity", None),
        ("ip-ad-spread", "ip-velocity"),
    ]
    assert _state(store) == (1, 1, 500, {"ip-ad-spread": 1})


def test_a_verdict_that_moves_a_click_flagged_earlier_in_the_same_commit_keeps_it_corrected(
    store: DuckDBStore,
) -> None:
    """One read of the IP family names e1 twice: spread first, then (past a context mark)
    velocity, whose verdict says e1 already stands under spread. Only the first verdict of
    a click says what stood before this commit: the spread verdict corrects e1, the
    velocity verdict then changes nothing (spread is the earlier rule). Reading the second
    verdict's ``previous_rule_id`` as the click's state before the commit skipped the
    correction and left e1 billable."""
    flagged = [("e1", "ip-ad-spread"), ("e1", "ip-velocity")]
    [applied] = store.commit_keyed([_commit("ip", flagged, previous={1: "ip-ad-spread"})])
    assert applied["rule_id"].to_pylist() == ["ip-ad-spread"]
    assert applied["previous_rule_id"].to_pylist() == [None]
    assert _state(store) == (1, 1, 500, {"ip-ad-spread": 1})
    assert store.keyed_corrections_by_rule() == {"ip-ad-spread": 1}


def test_a_fenced_commit_settles_nothing_and_each_family_fences_its_own_offsets(
    store: DuckDBStore,
) -> None:
    store.commit_keyed([_commit("ip", [("e1", "ip-velocity")])])
    with pytest.raises(FencedError):  # the IP family's partition 0 is at 1 now
        store.commit_keyed(
            [_commit("visitor", [("e2", "repeat-click")]), _commit("ip", [("e1", "x")])]
        )
    assert _state(store) == (1, 1, 500, {"ip-velocity": 1})
    assert store.keyed_progress("visitor") == {}
    # The visitor family's partition 0 is its own: it starts at 0.
    store.commit_keyed([_commit("visitor", [("e1", "repeat-click"), ("e2", "repeat-click")])])
    assert _state(store) == (0, 2, 0, {"repeat-click": 2})
    assert _applied(store, "visitor") == [
        ("e1", "repeat-click", "ip-velocity"),
        ("e2", "repeat-click", None),
    ]


def test_what_was_applied_is_kept_while_a_replay_may_need_it_and_settled_clicks_forgotten(
    store: DuckDBStore,
) -> None:
    store.commit_keyed([_commit("visitor", [("e1", "repeat-click")])])
    assert len(_applied(store, "visitor")) == 1
    later = _commit("visitor", [], lo=1)
    store.commit_keyed([KeyedCommit(**{**later.__dict__, "replay_from": 1})])
    assert _applied(store, "visitor") == []  # the keyed log starts after it
    # Forgotten only once both families are settled past the click.
    settle = {"settled_before_ms": MINUTE + 2_000}
    store.commit_keyed([KeyedCommit(**{**_commit("visitor", [], lo=2).__dict__, **settle})])
    store.commit_keyed([_commit("ip", [("e1", "ip-ad-spread")])])
    assert _state(store)[3] == {"ip-ad-spread": 1}  # still known: moved, not corrected
    store.commit_keyed([KeyedCommit(**{**_commit("ip", [], lo=1).__dict__, **settle})])
    [again] = store.commit_keyed([_commit("ip", [("e1", "ip-ad-spread")], lo=2)])
    # A click settled by every family is forgotten: a verdict now would correct it again,
    # which is why a family's bound must be past any verdict it can still make.
    assert again.num_rows == 1


def test_the_ad_familys_bound_holds_back_forgetting_until_it_is_released(
    store: DuckDBStore,
) -> None:
    """The ad family commits only while one of its rules is in force: a bound it recorded
    then holds the corrected clicks until it is released (its rules gone), after which the
    IP and visitor families' bounds alone decide."""
    settle = {"settled_before_ms": MINUTE + 2_000}
    store.commit_keyed([KeyedCommit(**{**_commit("ad", [("e1", "ctr-spike")]).__dict__})])
    early = {"settled_before_ms": MINUTE}  # e1 (at MINUTE + 1 s) is not settled by it
    store.commit_keyed([KeyedCommit(**{**_commit("ad", [], lo=1).__dict__, **early})])
    for family in ("ip", "visitor"):
        store.commit_keyed([KeyedCommit(**{**_commit(family, [], lo=0).__dict__, **settle})])
    [kept] = store.commit_keyed([_commit("ip", [("e1", "ip-ad-spread")], lo=1)])
    assert kept["previous_rule_id"].to_pylist() == ["ctr-spike"]  # still known: moved
    store.release_settled("ad")
    store.commit_keyed([KeyedCommit(**{**_commit("ip", [], lo=2).__dict__, **settle})])
    [again] = store.commit_keyed([_commit("ip", [("e1", "ip-ad-spread")], lo=3)])
    assert again["previous_rule_id"].to_pylist() == [None]  # forgotten: settled by both
    with pytest.raises(ValueError, match="unknown keyed family"):
        store.release_settled("nope")


def test_a_click_its_family_corrected_before_the_store_kept_them_is_not_corrected_again(
    store: DuckDBStore,
) -> None:
    """A data dir of a build before ``keyed_corrected``: the IP family's windows know e1
    stands under spread; velocity now moves it (counts untouched), not a new correction."""
    commit = _commit("ip", [("e1", "ip-ad-spread")])
    moved = commit.verdicts.set_column(  # type: ignore[union-attr]
        commit.verdicts.schema.get_field_index("previous_rule_id"),  # type: ignore[union-attr]
        VERDICT_SCHEMA.field("previous_rule_id"),
        pa.array(["ip-velocity"], pa.string()),
    )
    [applied] = store.commit_keyed([KeyedCommit(**{**commit.__dict__, "verdicts": moved})])
    assert applied["previous_rule_id"].to_pylist() == ["ip-velocity"]
    clicks, invalid, spend, _ = _state(store)
    assert (clicks, invalid, spend) == (2, 0, 1000)  # nothing corrected here


def test_a_file_without_applied_times_gains_the_column_and_reads_them_as_unknown(
    tmp_path: Path,
) -> None:
    """keyed_applied of an earlier build had no applied_at_ms: opening the file adds it, its
    rows read null (a recovery then stamps them with its own time), new rows their time."""
    import dataclasses

    import duckdb

    path = tmp_path / "agg.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE keyed_applied (family VARCHAR NOT NULL, keyed_partition INTEGER NOT NULL, "
        "from_offset BIGINT NOT NULL, seq INTEGER NOT NULL, event_id VARCHAR NOT NULL, "
        "rule_id VARCHAR NOT NULL, previous_rule_id VARCHAR)"
    )
    con.execute("INSERT INTO keyed_applied VALUES ('ip', 0, 0, 0, 'old', 'r', NULL)")
    con.close()
    store = DuckDBStore(path)
    try:
        [row] = store.keyed_applied("ip", 0, 0).to_pylist()
        assert row == {
            "event_id": "old",
            "rule_id": "r",
            "previous_rule_id": None,
            "applied_at_ms": None,
        }
        store.commit_keyed(
            [dataclasses.replace(_commit("ip", [("e7", "ip-velocity")]), committed_at_ms=5_000)]
        )
        rows = store.keyed_applied("ip", 0, 0).to_pylist()
        stamps = [(r["event_id"], r["applied_at_ms"]) for r in rows]
        assert stamps == [("old", None), ("e7", 5_000)]
    finally:
        store.close()
