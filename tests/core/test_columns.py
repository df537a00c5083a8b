"""The log frame format: one Arrow IPC stream of a fixed schema, readable by plain pyarrow."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickagg.core import columns
from clickagg.core.columns import SCHEMA, EventColumns, FrameFormatError

DOCUMENTED = [
    ("fp_high", pa.uint64(), False),
    ("fp_low", pa.uint64(), False),
    ("event_type", pa.uint8(), False),
    ("ts_ms", pa.int64(), False),
    ("received_ms", pa.int64(), False),
    ("cost_micros", pa.int64(), False),
    ("user_hash", pa.uint64(), False),
    ("event_id", pa.string(), False),
    ("ad_id", pa.string(), False),
    *(
        (name, pa.string(), True)
        for name in (
            "advertiser_id",
            "campaign_id",
            "user_id",
            "ip",
            "user_agent",
            "country",
            "device",
            "browser",
        )
    ),
]

NULLABLE = [name for name, _, nullable in DOCUMENTED if nullable]
U64 = st.integers(0, 2**64 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)
NULLABLE_TEXT = st.none() | st.text(max_size=12)  # any unicode, the empty string included
ROW = st.fixed_dictionaries(
    {
        "fp_high": U64,
        "fp_low": U64,
        "event_type": st.integers(0, 1),
        "ts_ms": I64,
        "received_ms": I64,
        "cost_micros": I64,
        "user_hash": U64,
        "event_id": st.text(max_size=12),
        "ad_id": st.text(max_size=12),
        **dict.fromkeys(NULLABLE, NULLABLE_TEXT),
    }
)


def row(n: int, **text: str | None) -> dict[str, Any]:
    """An event with every numeric column ``n``, ids ``e<n>`` and ``a``, no other text."""
    return {
        **dict.fromkeys(columns.NUMERIC_COLUMNS, n),
        "event_id": f"e{n}",
        "ad_id": "a",
        **dict.fromkeys(NULLABLE, None),
        **text,
    }


def batch_of(rows: list[dict[str, Any]], *, plain_lists: bool = False) -> EventColumns:
    """Columns of ``rows`` through ``columns.build``: text as Arrow arrays (the path of
    large requests) or as plain lists (small requests)."""
    numeric = {
        name: np.array([event[name] for event in rows], dtype=dtype)
        for name, dtype in columns.NUMERIC_COLUMNS.items()
    }
    text: dict[str, Any] = {name: [event[name] for event in rows] for name in columns.TEXT_COLUMNS}
    if not plain_lists:
        text = {name: pa.array(values, type=pa.string()) for name, values in text.items()}
    return columns.build(numeric, text, np.arange(len(rows)))


def read_with_pyarrow(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(payload).read_all()


def test_a_frame_is_the_ipc_stream_pyarrow_writes_with_the_documented_schema() -> None:
    assert [(f.name, f.type, f.nullable) for f in SCHEMA] == DOCUMENTED
    batch = batch_of([row(1, country="DE"), row(2)])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, SCHEMA) as writer:
        writer.write_batch(batch.record_batch())
    assert columns.encode(batch) == sink.getvalue().to_pybytes()


@settings(max_examples=60)
@given(st.lists(st.tuples(st.lists(ROW, max_size=12), st.booleans()), min_size=1, max_size=5))
def test_merged_requests_read_back_with_plain_pyarrow(
    parts: list[tuple[list[dict[str, Any]], bool]],
) -> None:
    """Nulls, unicode and empty strings survive build, group-commit merge and encode."""
    merged = columns.merge([batch_of(rows, plain_lists=plain) for rows, plain in parts])
    table = read_with_pyarrow(columns.encode(merged))
    assert table.schema.equals(SCHEMA)
    assert table.to_pylist() == [event for rows, _ in parts for event in rows]
    assert columns.decode(columns.encode(merged)).equals(table)


def test_a_large_batch_with_nulls_round_trips() -> None:
    """Past 64 rows the validity bitmap is built by numpy rather than a Python int."""
    rows = [
        row(n, **{name: None if n % 3 else f"{name}-{n}" for name in NULLABLE}) for n in range(200)
    ]
    for plain in (False, True):
        merged = columns.merge([batch_of(rows[:130], plain_lists=plain), batch_of(rows[130:])])
        assert read_with_pyarrow(columns.encode(merged)).to_pylist() == rows


def test_unicode_text() -> None:
    words = ["café", "日本語", "🙂 emoji", "", "Ωmega\u0301", "zero\u200bwidth"]
    rows = [
        {**row(0, **dict.fromkeys(NULLABLE, word)), "event_id": word, "ad_id": word[::-1]}
        for word in words
    ]
    for plain in (False, True):
        payload = columns.encode(batch_of(rows, plain_lists=plain))
        assert read_with_pyarrow(payload).to_pylist() == rows
        frame = columns.to_frame(columns.decode(payload), partition=0, base_offset=0)
        assert frame["ad_id"].to_list() == [word[::-1] for word in words]
        assert frame["user_agent"].to_list() == words


def test_an_empty_batch() -> None:
    empty = columns.ColumnBuilder().build()
    table = read_with_pyarrow(columns.encode(empty))
    assert table.num_rows == 0 and table.schema.equals(SCHEMA)
    merged = columns.merge([empty, batch_of([row(7)]), empty])
    assert read_with_pyarrow(columns.encode(merged)).to_pylist() == [row(7)]
    frame = columns.to_frame(columns.decode(columns.encode(empty)), partition=2, base_offset=5)
    assert frame.height == 0
    assert frame.schema == columns.empty_frame().schema


def test_to_frame_numbers_events_from_the_base_offset() -> None:
    payload = columns.encode(batch_of([row(0), row(1), row(2)]))
    frame = columns.to_frame(columns.decode(payload), partition=4, base_offset=10)
    assert frame.columns == [*columns.NUMERIC_COLUMNS, "partition", "offset", *columns.TEXT_COLUMNS]
    assert frame["offset"].to_list() == [10, 11, 12]
    assert frame["partition"].to_list() == [4, 4, 4]
    assert frame["event_id"].to_list() == ["e0", "e1", "e2"]


def test_decode_reads_any_ipc_stream_of_the_schema_and_nothing_else() -> None:
    rows = [row(n) for n in range(4)]
    record_batch = batch_of(rows).record_batch()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, SCHEMA) as writer:  # two batches: not what encode writes
        writer.write_batch(record_batch.slice(0, 1))
        writer.write_batch(record_batch.slice(1))
    assert columns.decode(sink.getvalue().to_pybytes()).to_pylist() == rows

    old_format = msgspec.msgpack.encode([1, b"\0" * 8, b"\0" * 8])  # a pre-Arrow frame
    with pytest.raises(FrameFormatError, match="cannot be read"):
        columns.decode(old_format)
    with pytest.raises(FrameFormatError, match="not an Arrow IPC stream"):
        columns.decode(columns.encode(batch_of(rows))[:-40])
    other = pa.BufferOutputStream()
    with pa.ipc.new_stream(other, pa.schema([("x", pa.int64())])) as writer:
        writer.write_batch(pa.record_batch([pa.array([1])], names=["x"]))
    with pytest.raises(FrameFormatError, match="unexpected schema"):
        columns.decode(other.getvalue().to_pybytes())


@given(NULLABLE_TEXT)
def test_a_one_row_column_is_the_one_element_list_column(value: str | None) -> None:
    assert columns.TextColumn.of_one(value) == columns.TextColumn.of_list([value])


@settings(max_examples=80)
@given(st.lists(st.lists(NULLABLE_TEXT, max_size=4), min_size=1, max_size=12))
def test_small_concat_is_the_numpy_concat(values: list[list[str | None]]) -> None:
    """The plain-Python concat of a group of small requests (most of them one row, built
    by ``of_one``) gives the same buffers as the numpy concat of large ones."""
    parts = [
        columns.TextColumn.of_one(part[0]) if len(part) == 1 else columns.TextColumn.of_list(part)
        for part in values
    ]
    counts = [len(part) for part in values]
    small = columns.TextColumn._concat_small(parts, counts)
    assert small == columns.TextColumn._concat_numpy(parts, counts)
    flat = [v for part in values for v in part]
    assert small.array(len(flat)).to_pylist() == flat


@settings(max_examples=60)
@given(st.lists(st.tuples(st.integers(0, 4), ROW), max_size=40))
def test_runs_cut_from_one_take_equal_a_build_per_run(
    tagged: list[tuple[int, dict[str, Any]]],
) -> None:
    """``build_runs`` (one take per column, then slices) gives each run exactly the columns
    ``build`` gives it alone: offsets rebased, data cut, a null mask only where the run
    has a null."""
    rows = [event for _, event in tagged]
    keys = np.array([key for key, _ in tagged], dtype=np.int64)
    numeric = {
        name: np.array([event[name] for event in rows], dtype=dtype)
        for name, dtype in columns.NUMERIC_COLUMNS.items()
    }
    text = {
        name: pa.array([event[name] for event in rows], type=pa.string())
        for name in columns.TEXT_COLUMNS
    }
    order = np.argsort(keys, kind="stable")
    _, starts = np.unique(keys[order], return_index=True)
    bounds = [*starts.tolist(), len(order)]
    runs = columns.build_runs(numeric, text, order, bounds)
    assert len(runs) == len(bounds) - 1
    for n, run in enumerate(runs):
        assert run == columns.build(numeric, text, order[bounds[n] : bounds[n + 1]])
