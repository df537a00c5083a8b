"""Event validation and normalization: per-field errors, time forms, ids, partitions."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clickagg.core import columns, ids
from clickagg.core.events import InvalidEvent, decode_many, decode_one, normalize

NOW = 1_700_000_000_000


def norm(body: bytes, *, default_type: int | None = None, partitions: int = 8):  # type: ignore[no-untyped-def]
    events, rejected = decode_many(body, ndjson=False)
    return normalize(
        events,
        default_type=default_type,
        partitions=partitions,
        now_ms=NOW,
        max_future_ms=300_000,
        rejected=rejected,
    )


def all_columns(batch) -> dict[str, list[object]]:  # type: ignore[no-untyped-def]
    merged: dict[str, list[object]] = {}
    for p, cols in sorted(batch.by_partition.items()):
        frame = columns.to_frame(columns.decode(columns.encode(cols)), partition=p, base_offset=0)
        for name in frame.columns:
            merged.setdefault(name, []).extend(frame[name].to_list())
    return merged


@pytest.mark.parametrize(
    "timestamp",
    [
        "1700000000",
        "1700000000000",
        "1700000000.0",
        '"2023-11-14T22:13:20Z"',
        '"2023-11-14T22:13:20"',
        '"2023-11-14T23:13:20+01:00"',
    ],
)
def test_every_time_form_means_the_same_instant(timestamp: str) -> None:
    batch = norm(f'[{{"event_type":"click","ad_id":"a","timestamp":{timestamp}}}]'.encode())
    assert batch.rejected == []
    assert all_columns(batch)["ts_ms"] == [1_700_000_000_000]


def test_synthesized_id_is_stable_across_key_order_and_time_form() -> None:
    a = norm(b'[{"event_type":"click","ad_id":"a","user_id":"u","timestamp":1700000000}]')
    b = norm(
        b'[{"timestamp":"2023-11-14T22:13:20Z","user_id":"u","ad_id":"a","event_type":"click"}]'
    )
    c = norm(b'[{"event_type":"click","ad_id":"a","user_id":"v","timestamp":1700000000}]')
    assert a.event_ids == b.event_ids
    assert a.event_ids != c.event_ids
    assert a.event_ids[0].startswith("h")


def test_ids_fingerprints_and_partitions_agree_with_ids_module() -> None:
    body = (
        b"["
        + b",".join(
            f'{{"event_type":"{"click" if n % 2 else "impression"}","event_id":{n},"ad_id":"a",'
            f'"timestamp":1700000000}}'.encode()
            for n in range(300)
        )
        + b"]"
    )
    batch = norm(body, partitions=7)
    cols = all_columns(batch)
    for event_id, event_type, high, low, partition in zip(
        cols["event_id"],
        cols["event_type"],
        cols["fp_high"],
        cols["fp_low"],
        cols["partition"],
        strict=True,
    ):
        assert isinstance(event_id, str) and isinstance(event_type, int)
        assert ids.fingerprint(event_type, event_id) == (high, low)
        assert partition == ids.partition_for_id(event_type, event_id, 7)
    assert sorted(batch.event_ids, key=int) == [str(n) for n in range(300)]


def test_order_within_a_partition_is_request_order() -> None:
    body = (
        b"["
        + b",".join(
            f'{{"event_type":"click","event_id":"e{n}","ad_id":"a","timestamp":1700000000}}'.encode()
            for n in range(100)
        )
        + b"]"
    )
    for cols in norm(body, partitions=3).by_partition.values():
        numbers = [int(e[1:]) for e in cols.text("event_id").to_pylist()]
        assert numbers == sorted(numbers)


def test_rejections_name_the_field_and_keep_request_indices() -> None:
    batch = norm(
        b'[{"event_type":"click","ad_id":"a","timestamp":1700000000},'
        b'{"event_type":"click","ad_id":"a","timestamp":1800000000},'
        b'{"event_type":"click","ad_id":"a"},'
        b'{"ad_id":"a","timestamp":1700000000},'
        b'{"event_type":"click","ad_id":"a","timestamp":99999999999999999999999}]'
    )
    assert batch.accepted == 1
    errors = {r.index: r.error for r in batch.rejected}
    assert "future" in errors[1]
    assert "timestamp" in errors[2]
    assert "event_type" in errors[3]
    assert "timestamp" in errors[4]


def test_user_agent_gives_device_and_browser_unless_given() -> None:
    iphone = (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
    )
    bot = "Googlebot/2.1 (+http://www.google.com/bot.html)"
    body = (
        f'[{{"event_type":"click","ad_id":"a","timestamp":1700000000,"user_agent":"{iphone}"}},'
        f'{{"event_type":"click","ad_id":"a","timestamp":1700000000,"user_agent":"{bot}"}},'
        f'{{"event_type":"click","ad_id":"a","timestamp":1700000000,"user_agent":"{iphone}",'
        f'"device":"TV","browser":"Own"}}]'
    ).encode()
    cols = all_columns(norm(body, partitions=1))
    assert cols["device"] == ["mobile", "bot", "tv"]
    assert cols["browser"][0] == "Mobile Safari" and cols["browser"][2] == "Own"


def test_single_event_errors() -> None:
    with pytest.raises(InvalidEvent, match="malformed"):
        decode_one(b"{")
    with pytest.raises(InvalidEvent, match="ad_id"):
        decode_one(b'{"timestamp": 1}')
    batch = normalize(
        [decode_one(b'{"ad_id":"a","timestamp":1700000000,"event_type":"click"}')],
        default_type=ids.IMPRESSION,
        partitions=2,
        now_ms=NOW,
        max_future_ms=0,
    )
    assert batch.accepted == 0 and "does not match" in batch.rejected[0].error


@given(
    st.lists(
        st.tuples(st.sampled_from(["click", "impression"]), st.text(min_size=1, max_size=20)),
        max_size=50,
    )
)
def test_numeric_columns_round_trip_through_the_log_format(items: list[tuple[str, str]]) -> None:
    import msgspec

    body = msgspec.json.encode(
        [
            {"event_type": t, "event_id": i, "ad_id": "a", "timestamp": 1_700_000_000, "user_id": i}
            for t, i in items
        ]
    )
    batch = norm(body, partitions=4)
    total = 0
    for cols in batch.by_partition.values():
        decoded = columns.decode(columns.encode(cols))
        assert decoded.equals(pa.Table.from_batches([cols.record_batch()]))
        for name in columns.NUMERIC_COLUMNS:
            assert decoded[name].to_numpy().tobytes() == getattr(cols, name), name
        users = decoded["user_id"].to_pylist()
        assert [ids.user_hash(u) for u in users] == decoded["user_hash"].to_pylist()
        total += decoded.num_rows
    assert total == len(items) == batch.accepted


@given(
    st.lists(
        st.tuples(st.text(max_size=8), st.none() | st.text(max_size=6), st.booleans()),
        min_size=1,
        max_size=80,
    )
)
def test_one_by_one_then_merged_equals_the_whole_batch(
    items: list[tuple[str, str | None, bool]],
) -> None:
    """The small-batch (Python) and large-batch (Arrow) paths and group-commit merging all
    produce the same log columns."""
    import msgspec

    raw = [
        {
            "event_type": "click" if click else "impression",
            "event_id": f"{n}-{text}",
            "ad_id": text or "a",
            "timestamp": 1_700_000_000,
            "country": maybe,
            "user_id": maybe,
        }
        for n, (text, maybe, click) in enumerate(items)
    ]
    whole = norm(msgspec.json.encode(raw), partitions=3)
    singles = [norm(msgspec.json.encode([item]), partitions=3) for item in raw]
    for partition, cols in whole.by_partition.items():
        parts = [s.by_partition[partition] for s in singles if partition in s.by_partition]
        merged = columns.merge(parts)
        for name in columns.TEXT_COLUMNS:
            assert merged.text(name).to_pylist() == cols.text(name).to_pylist(), name
        for name in columns.NUMERIC_COLUMNS:
            assert getattr(merged, name) == getattr(cols, name), name


@given(st.lists(st.sampled_from(["good", "bad", "two", "type"]), min_size=1, max_size=70))
def test_ndjson_rejects_exactly_the_bad_lines(kinds: list[str]) -> None:
    lines = {
        "good": b'{"event_type":"click","ad_id":"a","timestamp":1700000000}',
        "bad": b'{"event_type":"click",',
        "two": b'{"event_type":"click","ad_id":"a","timestamp":1} {"ad_id":"b","timestamp":2}',
        "type": b'{"event_type":"click","ad_id":[],"timestamp":1700000000}',
    }
    body = b"\n".join(lines[k] for k in kinds) + b"\n"
    events, rejected = decode_many(body, ndjson=True)
    assert len(events) == len(kinds)
    assert [r.index for r in rejected] == [n for n, k in enumerate(kinds) if k != "good"]
    assert all((e is None) == (k != "good") for e, k in zip(events, kinds, strict=True))


DEEP = b"[" * 5000 + b"]" * 5000  # past any interpreter's recursion limit
HOSTILE_LINES = {
    "deep": DEEP,
    "deep_unknown_field": b'{"event_type":"click","ad_id":"a","timestamp":1700000000,"x":'
    + DEEP
    + b"}",
    "not_utf8": b'{"event_type":"click","ad_id":"a\xff","timestamp":1700000000}',
    "truncated_utf8": b'{"event_type":"click","ad_id":"a","user_id":"\xe2\x82"'
    b',"timestamp":1700000000}',
    "utf8_surrogate": b'{"event_type":"click","ad_id":"\xed\xa0\x80","timestamp":1700000000}',
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_LINES))
def test_hostile_single_event_is_invalid_not_a_crash(kind: str) -> None:
    expected = {"deep": "Expected `object`", "deep_unknown_field": "nested too deeply"}
    with pytest.raises(InvalidEvent, match=expected.get(kind, "not valid UTF-8")):
        decode_one(HOSTILE_LINES[kind])


@given(st.lists(st.sampled_from(["good", *HOSTILE_LINES]), min_size=1, max_size=40))
def test_hostile_ndjson_lines_are_rejected_by_index(kinds: list[str]) -> None:
    lines = {"good": b'{"event_type":"click","ad_id":"a","timestamp":1700000000}', **HOSTILE_LINES}
    events, rejected = decode_many(b"\n".join(lines[k] for k in kinds), ndjson=True)
    assert len(events) == len(kinds)
    assert [r.index for r in rejected] == [n for n, k in enumerate(kinds) if k != "good"]
    assert all((e is None) == (k != "good") for e, k in zip(events, kinds, strict=True))


def test_hostile_json_array() -> None:
    good = b'{"event_type":"click","ad_id":"a","timestamp":1700000000}'
    # items that can be split out are rejected one by one
    body = b"[" + b",".join([good, HOSTILE_LINES["not_utf8"], good]) + b"]"
    events, rejected = decode_many(body, ndjson=False)
    assert [e is None for e in events] == [False, True, False]
    assert [r.index for r in rejected] == [1] and "UTF-8" in rejected[0].error
    # too deep to be split into items at all: refused whole, saying why
    with pytest.raises(InvalidEvent, match=r"not a JSON array of events.*nested too deeply"):
        decode_many(
            b"[" + b",".join([good, HOSTILE_LINES["deep_unknown_field"]]) + b"]", ndjson=False
        )
    with pytest.raises(InvalidEvent, match="nested too deeply"):
        decode_many(DEEP, ndjson=False)


@pytest.mark.parametrize("default_type", [None, ids.CLICK, ids.IMPRESSION])
@pytest.mark.parametrize(
    "item",
    [
        b'{"ad_id":"a","timestamp":1700000000}',
        b'{"ad_id":"a","timestamp":1700000000,"event_type":"click"}',
        b'{"ad_id":"a","timestamp":1700000000,"event_type":"impression","event_id":7}',
        b'{"ad_id":"a","timestamp":1700000000.5,"click_id":"c","impression_id":"i"}',
        b'{"ad_id":"a","timestamp":"2023-11-14T22:13:20Z","user_agent":"Googlebot/2.1"}',
        b'{"ad_id":"a","timestamp":5,"event_type":"click"}',
        b'{"ad_id":"a","timestamp":1800000000,"event_type":"click"}',
        b'{"ad_id":9,"timestamp":1700000000123,"event_type":"click","country":"de"}',
        # device and browser: derived, given, half given, empty, with an empty agent
        b'{"ad_id":"a","timestamp":1700000000,"user_agent":"Mozilla/5.0 (iPad; CPU OS 17_4)"}',
        b'{"ad_id":"a","timestamp":1700000000,"user_agent":"Googlebot/2.1","device":"TV"}',
        b'{"ad_id":"a","timestamp":1700000000,"user_agent":"Googlebot/2.1","browser":"B"}',
        b'{"ad_id":"a","timestamp":1700000000,"user_agent":"Googlebot/2.1","device":""}',
        b'{"ad_id":"a","timestamp":1700000000,"user_agent":"","device":"Phone"}',
        b'{"ad_id":"a","timestamp":1700000000,"user_agent":""}',
        b'{"ad_id":"a","timestamp":1700000000,"device":"X","browser":"Y"}',
    ],
)
def test_single_event_path_matches_the_batch_path(item: bytes, default_type: int | None) -> None:
    """One event takes the plain-Python path; the same event in a batch the columnar one."""
    filler = b'{"ad_id":"f","timestamp":1700000000,"event_type":"click","event_id":"filler"}'
    if default_type == ids.IMPRESSION:
        filler = filler.replace(b'"click"', b'"impression"')
    one = normalize(
        [decode_one(item)],
        default_type=default_type,
        partitions=4,
        now_ms=NOW,
        max_future_ms=300_000,
    )
    two = normalize(
        [decode_one(item), decode_one(filler)],
        default_type=default_type,
        partitions=4,
        now_ms=NOW,
        max_future_ms=300_000,
    )
    assert [(r.index, r.error) for r in one.rejected] == [
        (r.index, r.error) for r in two.rejected if r.index == 0
    ]
    if one.accepted:
        assert one.event_ids[0] == two.event_ids[0]
        ((partition, cols),) = one.by_partition.items()
        batch_cols = two.by_partition[partition]
        position = batch_cols.text("event_id").to_pylist().index(one.event_ids[0])
        for name in columns.TEXT_COLUMNS:
            assert cols.text(name).to_pylist()[0] == batch_cols.text(name).to_pylist()[position]
        for name in columns.NUMERIC_COLUMNS:
            assert cols.numeric(name)[0] == batch_cols.numeric(name)[position], name
