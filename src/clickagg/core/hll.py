"""Unique users as Apache DataSketches HLL sketches, byte-compatible with Spark and PostgreSQL.

Parameters: ``lg_k = 12`` (K = 4096 registers), target type HLL_8, serialized with the
*updatable* layout. These are exactly Spark's defaults (3.5+): ``hll_sketch_agg(col)`` builds
``new HllSketch(12, TgtHllType.HLL_8)``, updates it with a string's UTF-8 bytes (nulls and
empty strings ignored, as here), and returns ``toUpdatableByteArray``; ``hll_union_agg`` and
``hll_union`` merge with a DataSketches ``Union`` and return HLL_8 updatable bytes too;
``hll_sketch_estimate`` is ``Math.round(getEstimate)``, which :func:`estimate` reproduces.
The PostgreSQL extension (``hll_sketch_build``/``hll_sketch_union``, default lg_k 12) and
the DuckDB/Python/Java/C++ libraries read and merge these bytes as they are (same
MurmurHash3 seed, same serial format), so a stream sketch and a Spark sketch of the same
user ids union correctly and, once merged, estimate the same.

Equal *bytes* are a narrower promise (measured against Spark 4.3, ``tests/batch/test_spark.py``):
fed the users in our order, ``hll_sketch_agg`` returns exactly these bytes. In Spark's
own order, a small (LIST/SET mode) sketch holds the same coupons in other hash-table
slots, and an HLL-mode sketch has the same 4,096 registers but differs in two header
fields: the out-of-order flag we set (so our estimate is order-free) and Spark's
order-dependent HIP accumulator. Spark then estimates its own sketch with HIP (e.g. 986
or 991 for 1,000 users, by plan), ours with the composite estimator (997); a union of
the two gives 997 either way. Compare sketches by their union or estimate, not bytes.

Why HLL and not CPC: CPC is about 30-40 % smaller serialized for the same accuracy, but
Spark ships only HLL (``hll_sketch_agg``/``hll_union_agg``), and Spark, PostgreSQL and
Druid all read DataSketches HLL bytes; interoperability of the stored bytes matters more
here than a few hundred bytes per busy (ad, minute). HLL_8 over HLL_4: Spark's choice (so
our bytes match its bytes) and the fastest to union; 4,136 bytes per sketch at most.

Error bound (DataSketches HLL docs): the relative standard error is 1.04 / sqrt(K) for the
composite estimator that merged sketches use, 1.625 % for lg_k = 12 (the library's own
tabulated bounds: 1.62 % at 1 sigma, 4.7 % at 3 sigma); the HIP estimator of a sketch built
in one pass would be 0.8326 / sqrt(K) = 1.30 %. Small counts are exact: a sketch starts in
LIST then SET ("coupon") mode, which keeps one 32-bit coupon per distinct user, and only
turns into the K-register HLL array past 3/4 of 2^(lg_k - 3) = 384 coupons; up to
:data:`EXACT_UP_TO` distinct users the rounded estimate is the true count (barring a 26-bit
coupon collision, odds ~1e-5 at 384 users).

Determinism: every sketch this module returns that is in HLL mode carries the out-of-order
flag, i.e. uses the composite estimator, which depends on the registers only. So the
estimate is a function of the set of users alone, whatever the order and the split of the
events into rounds, and in HLL mode the bytes are too (the union of the sketches of any
split equals the sketch of the whole, byte for byte). In LIST/SET mode the estimate is the
same for any split, but the byte layout of the coupons follows the update order; updates
go in (group, user) order so the same events always give the same bytes.

How the bytes are built: :func:`sketches_by_group` makes no library call per user (one
``update`` per distinct (group, user), holding the GIL, was ~17 % of a worker's CPU). It
ranks the user ids (:func:`rank_users`: each id's place among the distinct ids in sorted
order) and hashes each distinct id once (MurmurHash3_x64_128, seed 9001, over the UTF-8
bytes, as the library hashes a string; polars-hash), turning the hashes into coupons with
numpy; a worker round ranks its users once for all five tables it sketches
(:func:`sketches_by_ranked_group`). The (group, rank) pairs sorted as integers are each
group's users in the library path's update order, and each group is laid out as the
library would have. HLL mode (over 384 distinct coupons): the register maxima, with the
header of a union result (out of order, HIP 0, KxQ sums and zero count recomputed from the
registers), needing no order at all. LIST mode (up to 7 coupons): the coupons in update
order. SET mode (8 to 384): the library's open-addressing inserts and table growths
replayed in update order for all groups at once, each numpy step one probe in every table.
The per-user path stays as :func:`sketches_by_group_via_library`, the definition these
bytes must equal; the tests hold the two equal, byte for byte.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import datasketches
import numpy as np
import numpy.typing as npt
import polars as pl
import polars_hash as plh
import pyarrow as pa

LG_K = 12
K = 1 << LG_K
TARGET = datasketches.HLL_8
RELATIVE_STANDARD_ERROR = 1.04 / math.sqrt(K)
EXACT_UP_TO = 3 * (1 << (LG_K - 3)) // 4

# Serialized preamble (DataSketches HLL format): byte 5 holds the flags, byte 7 the mode.
_FLAGS_BYTE = 5
_OUT_OF_ORDER_FLAG = 16
_MODE_BYTE = 7
_MODE_MASK = 3
_HLL_MODE = 2

_EMPTY: bytes = datasketches.hll_sketch(LG_K, TARGET).serialize_updatable()

# The rest of the DataSketches HLL layout, as its C++ source (HllUtil.hpp) defines it.
_SEED = 9001  # DEFAULT_SEED of every DataSketches family
_KEY_MASK_26 = (1 << 26) - 1
_SER_VER = 1
_FAMILY_ID = 7
_TARGET_HLL_8 = 2 << 2  # the target type's bits in the mode byte
_LIST_MODE, _SET_MODE = 0, 1
_LIST_PREINTS, _SET_PREINTS, _HLL_PREINTS = 2, 3, 10
_LG_LIST_SLOTS = 3  # a LIST holds up to 7 coupons; the 8th turns it into a SET
_LG_FIRST_SET_SLOTS = 5
_MAX_LIST_COUPONS = (1 << _LG_LIST_SLOTS) - 1
_INVERSE_POWERS_OF_2 = np.ldexp(1.0, -np.arange(64))
_HLL_REGISTERS_START = 40  # after the preamble, HIP, KxQ0, KxQ1, zero and aux counts


def _finish(sketch: datasketches.hll_sketch) -> bytes:
    """Serialized ``sketch``; in HLL mode, marked out of order so the estimate is canonical."""
    data: bytes = sketch.serialize_updatable()
    if data[_MODE_BYTE] & _MODE_MASK == _HLL_MODE and not data[_FLAGS_BYTE] & _OUT_OF_ORDER_FLAG:
        # A union of two HLL-mode sketches sets the flag; a sketch with itself keeps its registers.
        merger = datasketches.hll_union(LG_K)
        merger.update(sketch)
        merger.update(sketch)
        data = merger.get_result(TARGET).serialize_updatable()
    return data


def _distinct_pairs(
    group_index: npt.NDArray[np.int64], users: pa.Array | pa.ChunkedArray | pl.Series
) -> pl.DataFrame:
    """Distinct (group, user) pairs with a user, sorted by group then user."""
    frame = pl.DataFrame({"g": group_index, "u": _series(users)})
    first = (pl.col("g") != pl.col("g").shift(1)) | (pl.col("u") != pl.col("u").shift(1))
    return (
        frame.lazy()
        .filter(pl.col("u").is_not_null() & (pl.col("u") != ""))
        .sort("g", "u")
        .filter(first.fill_null(value=True))
        .collect()
    )


def _check(group_index: npt.NDArray[np.int64], users_count: int, groups: int) -> None:
    if len(group_index) != users_count:
        raise ValueError(f"{len(group_index)} group indexes for {users_count} users")
    if len(group_index) and (group_index.min() < 0 or group_index.max() >= groups):
        raise ValueError(f"group indexes must lie in [0, {groups})")


def sketches_by_group(
    group_index: npt.NDArray[np.int64],
    users: pa.Array | pa.ChunkedArray | pl.Series,
    groups: int,
) -> pa.BinaryArray:
    """One serialized HLL sketch per group of the users of its events.

    ``group_index[i]`` (in ``range(groups)``) is the group of event ``i`` and ``users[i]`` its
    user id string; a null or empty user id means no user. The result has ``groups`` entries,
    null where a group has no user. Byte for byte what :func:`sketches_by_group_via_library`
    returns, without a library call per user.
    """
    group_index = np.asarray(group_index, dtype=np.int64)
    _check(group_index, len(users), groups)
    ranked = rank_users(users)
    has_user = ranked.ranks >= 0
    return sketches_by_ranked_group(
        group_index[has_user], ranked.ranks[has_user], ranked.coupons, groups
    )


class RankedUsers(NamedTuple):
    """A column of user ids as ranks among its distinct ids in sorted order, and each
    rank's coupon: what :func:`sketches_by_ranked_group` takes.

    Why ranks: a worker round builds the sketches of five tables (minute rows and four
    breakdowns) from one column of users. Ranked once, each table finds its rows' distinct
    users among integers, not strings, every user is hashed once, not once per table, and
    sorting by rank is sorting by id, the order the library path updates in."""

    ranks: npt.NDArray[np.int64]  # per event; -1 for a null or empty id
    coupons: npt.NDArray[np.uint32]  # per rank


def rank_users(users: pa.Array | pa.ChunkedArray | pl.Series) -> RankedUsers:
    """Rank ``users`` (null and empty ids: -1) and hash each distinct id once."""
    frame = pl.DataFrame({"u": _series(users).cast(pl.String)}).select(
        pl.when(pl.col("u") != "").then(pl.col("u")).alias("u")
    )
    ranked = frame.select(
        (pl.col("u").rank("dense").cast(pl.Int64) - 1).fill_null(-1).alias("rank")
    )
    distinct = (
        frame.lazy().select(pl.col("u").drop_nulls().unique().sort()).with_columns(_digests("u"))
    ).collect()
    if not distinct.height:
        return RankedUsers(ranked["rank"].to_numpy(), np.zeros(0, dtype=np.uint32))
    low, high = _digest_halves(distinct["digest"])
    return RankedUsers(ranked["rank"].to_numpy(), _coupons(low, high))


def sketches_by_ranked_group(
    group_index: npt.NDArray[np.int64],
    ranks: npt.NDArray[np.int64],
    coupons: npt.NDArray[np.uint32],
    groups: int,
) -> pa.BinaryArray:
    """:func:`sketches_by_group` of users given as ranks (:func:`rank_users`): event ``i``
    of group ``group_index[i]`` has the user of rank ``ranks[i]``, whose coupon is
    ``coupons[ranks[i]]``. Pairs may repeat and come in any order."""
    group_index = np.asarray(group_index, dtype=np.int64)
    ranks = np.asarray(ranks, dtype=np.int64)
    _check(group_index, len(ranks), groups)
    if len(ranks) and (ranks.min() < 0 or ranks.max() >= len(coupons)):
        raise ValueError(f"user ranks must lie in [0, {len(coupons)})")
    # Distinct (group, rank) pairs, by group and then rank: each group's update order.
    pairs = np.sort((group_index.astype(np.uint64) << np.uint64(32)) | ranks.astype(np.uint64))
    pairs = pairs[np.concatenate(([True], pairs[1:] != pairs[:-1]))] if len(pairs) else pairs
    pair_group = (pairs >> np.uint64(32)).astype(np.int64)
    return _sketches_in_update_order(
        pair_group, coupons[(pairs & np.uint64(0xFFFFFFFF)).astype(np.int64)], groups
    )


def _sketches_in_update_order(
    pair_group: npt.NDArray[np.int64],
    pair_coupons: npt.NDArray[np.uint32],
    groups: int,
) -> pa.BinaryArray:
    """The sketches of (group, coupon) pairs sorted by group, each group's in update order.

    HLL mode (over 384 distinct coupons): the register maxima, needing no order. LIST and
    SET mode: each group's distinct coupons in update order, laid out as the library would
    have."""
    blocks: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]] = []
    if len(pair_group):
        # A coupon seen before in its group changes nothing, in any mode: the first of each
        # (group, coupon) in update order is what the library inserts.
        # Two users share a coupon rarely (26 address bits): look for one with a sort.
        keys = (pair_group.astype(np.uint64) << np.uint64(32)) | pair_coupons
        ordered = np.sort(keys)
        if bool((ordered[1:] == ordered[:-1]).any()):
            first = pl.Series(keys).is_first_distinct().to_numpy()
            event_group, coupons = pair_group[first], pair_coupons[first]
        else:
            event_group, coupons = pair_group, pair_coupons
        counts = np.bincount(event_group, minlength=groups)
        in_list = (counts > 0) & (counts <= _MAX_LIST_COUPONS)
        in_hll = counts > EXACT_UP_TO
        in_set = (counts > _MAX_LIST_COUPONS) & ~in_hll
        small = in_list | in_set
        if small.any():
            ordered = coupons[small[event_group]]
            starts = np.zeros(groups, dtype=np.int64)
            starts[small] = np.cumsum(counts[small]) - counts[small]
            if in_list.any():
                blocks.append(_list_block(np.flatnonzero(in_list), ordered, starts, counts))
            if in_set.any():
                blocks.extend(_set_blocks(np.flatnonzero(in_set), ordered, starts, counts))
        if in_hll.any():
            of_hll = in_hll[event_group]
            blocks.append(_hll_block(in_hll, event_group[of_hll], coupons[of_hll]))
    return _binary_array(groups, blocks)


def _series(users: pa.Array | pa.ChunkedArray | pl.Series) -> pl.Series:
    return users if isinstance(users, pl.Series) else pl.Series(users)


def _digests(column: str) -> pl.Expr:
    """MurmurHash3_x64_128 (seed 9001) of each id's UTF-8 bytes, as the library hashes a
    string: 16 bytes, the two 64-bit halves little-endian."""
    return plh.col(column).nchash.murmur128(seed=_SEED, return_binary=True).alias("digest")


def _digest_halves(
    digests: pl.Series,
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """The low and high 64-bit halves of each 16-byte digest, read from the Arrow buffer."""
    # The oldest compatibility level gives a large_binary array: int64 offsets, one buffer.
    arrow = digests.rechunk().to_arrow(compat_level=pl.CompatLevel.oldest())
    if isinstance(arrow, pa.ChunkedArray):
        arrow = arrow.combine_chunks()
    offsets = np.frombuffer(arrow.buffers()[1], dtype=np.int64)
    offsets = offsets[arrow.offset : arrow.offset + len(arrow) + 1]
    if arrow.type != pa.large_binary() or arrow.null_count or np.any(np.diff(offsets) != 16):
        raise AssertionError("expected one 16-byte digest per user id")
    halves = np.frombuffer(arrow.buffers()[2], dtype="<u8")[offsets[0] // 8 : offsets[-1] // 8]
    pairs = halves.reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def _bit_length(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    """Bits needed for each value (0 for 0): smear the top bit down, count the ones."""
    smeared = values.copy()
    for shift in (1, 2, 4, 8, 16, 32):
        smeared |= smeared >> np.uint64(shift)
    return np.bitwise_count(smeared)


def _coupons(low: npt.NDArray[np.uint64], high: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint32]:
    """The library's coupon: 26 address bits of the low half, 1 + leading zeros of the high."""
    address = (low & np.uint64(_KEY_MASK_26)).astype(np.uint32)
    return (_values(high).astype(np.uint32) << np.uint32(26)) | address


def _values(high: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    """The register value of each hash: 1 + its high half's leading zeros, at most 63."""
    return np.minimum(64 - _bit_length(high), 62) + 1


def _list_block(
    group_ids: npt.NDArray[np.int64],
    coupons: npt.NDArray[np.uint32],
    starts: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """LIST-mode sketches: the coupons in update order, then empty slots."""
    layout = np.dtype([("preamble", "u1", 8), ("coupons", "<u4", 1 << _LG_LIST_SLOTS)])
    out = np.zeros(len(group_ids), dtype=layout)
    out["preamble"] = _preamble(_LIST_PREINTS, _LG_LIST_SLOTS, _LIST_MODE)
    out["preamble"][:, 6] = counts[group_ids]
    group_counts = counts[group_ids]
    row = np.repeat(np.arange(len(group_ids)), group_counts)
    rank = np.arange(len(row)) - np.repeat(np.cumsum(group_counts) - group_counts, group_counts)
    out["coupons"][row, rank] = coupons[np.repeat(starts[group_ids], group_counts) + rank]
    return group_ids, out.view(np.uint8).reshape(len(group_ids), -1)


def _set_blocks(
    group_ids: npt.NDArray[np.int64],
    coupons: npt.NDArray[np.uint32],
    starts: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int64],
) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]]:
    """SET-mode sketches, one block per table size.

    The slot of a coupon depends on the coupons inserted before it and on the growths of the
    table, so the library's inserts are replayed in order. Every group grows at the same
    counts (past 3/4 of its table), so the replay goes table size by table size: each size
    takes the coupons of the smaller table it replaces, in slot order as the library
    re-inserts them, then its own share of the group's coupons in update order.
    """
    order = group_ids[np.argsort(-counts[group_ids], kind="stable")]
    order_counts = counts[order]
    order_starts = starts[order]
    blocks = []
    lg = _LG_FIRST_SET_SLOTS
    tables = np.zeros((len(order), 1 << lg), dtype=np.uint32)
    moved = np.zeros(0, dtype=np.uint32)  # coupons of the outgrown tables, row by row
    moved_rows = np.zeros(0, dtype=np.int64)
    first_rank = 0
    while True:
        rows = len(tables)
        grow_at = (3 << lg) // 4 + 1  # the count that makes this table grow
        lengths = np.minimum(order_counts[:rows], grow_at) - first_rank
        new_rows = np.repeat(np.arange(rows), lengths)
        rank = np.arange(len(new_rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        new = coupons[order_starts[new_rows] + first_rank + rank]
        _insert_in_order(
            tables, np.concatenate((moved, new)), np.concatenate((moved_rows, new_rows))
        )
        growing = int(np.count_nonzero(order_counts[:rows] >= grow_at))
        if growing < rows:
            blocks.append(_set_block(order[growing:rows], tables[growing:], counts))
        if not growing:
            return blocks
        outgrown = tables[:growing]
        moved = outgrown[outgrown != 0]  # row by row, in slot order
        moved_rows = np.repeat(np.arange(growing), grow_at)
        lg += 1
        tables = np.zeros((growing, 1 << lg), dtype=np.uint32)
        first_rank = grow_at


def _set_block(
    group_ids: npt.NDArray[np.int64],
    tables: npt.NDArray[np.uint32],
    counts: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    slots = tables.shape[1]
    layout = np.dtype([("preamble", "u1", 8), ("count", "<u4"), ("slots", "<u4", slots)])
    out = np.zeros(len(group_ids), dtype=layout)
    out["preamble"] = _preamble(_SET_PREINTS, slots.bit_length() - 1, _SET_MODE)
    out["count"] = counts[group_ids]
    out["slots"] = tables
    return group_ids, out.view(np.uint8).reshape(len(group_ids), -1)


def _insert_in_order(
    tables: npt.NDArray[np.uint32], coupons: npt.NDArray[np.uint32], rows: npt.NDArray[np.int64]
) -> None:
    """Insert each coupon into the empty hash table ``tables[rows[i]]`` as the library does,
    a table's coupons in their order in ``coupons``; none twice in one table.

    The library's open addressing: a coupon goes to the slot of its low bits or, if taken,
    steps on by an odd stride taken from its higher address bits until a slot is free. One
    at a time, that would be a numpy step per coupon rank. Instead all coupons probe at
    once: a slot goes to the earliest coupon that asks for it, so a later one that held it
    moves on, as does every coupon that asked and lost. A slot, once lost to an earlier
    coupon, stays with an earlier one; so when no coupon moves, each sits in the first slot
    of its probe sequence that no earlier coupon took: where the library puts it. The rounds
    number about the longest chain of displacements, not the coupons per table.
    """
    flat = tables.reshape(-1)
    lg = tables.shape[1].bit_length() - 1
    mask = (1 << lg) - 1
    nobody = len(coupons)
    owner = np.full(len(flat), nobody, dtype=np.int64)
    where = (rows << lg) | (coupons & np.uint32(mask)).astype(np.int64)
    stride = (((coupons & np.uint32(_KEY_MASK_26)) >> np.uint32(lg)) | np.uint32(1)).astype(
        np.int64
    )
    movers = np.arange(len(coupons))
    while len(movers):
        slots = where[movers]
        before = owner[slots]
        np.minimum.at(owner, slots, movers)
        after = owner[slots]
        ousted = np.unique(before[(after != before) & (before != nobody)])
        movers = np.concatenate((movers[after != movers], ousted))
        # Tables are 2**lg apart: the high bits of a flat position name the table, the low
        # ``lg`` bits the slot, so masking the sum keeps the probe in its table.
        at = where[movers]
        where[movers] = (at & ~mask) | ((at + stride[movers]) & mask)
    flat[where] = coupons


def _hll_block(
    in_hll: npt.NDArray[np.bool_],
    pair_group: npt.NDArray[np.int64],
    coupons: npt.NDArray[np.uint32],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """HLL-mode sketches as :func:`_finish` leaves them: what a union returns.

    Each register holds the largest value of the coupons of its slot. A union result is
    rebuilt from its registers alone: out of order, HIP accumulator 0, KxQ0 = the sum of
    2^-v over the registers below 32 (zeros count 1), KxQ1 over the rest, current minimum 0
    with the count of zero registers. The sums are exact in any order (multiples of 2^-63
    well inside a double's 53 bits), so they equal the library's running sums.
    """
    group_ids = np.flatnonzero(in_hll)
    layout = np.dtype(
        [
            ("preamble", "u1", 8),
            ("hip", "<f8"),
            ("kxq0", "<f8"),
            ("kxq1", "<f8"),
            ("at_cur_min", "<u4"),
            ("aux_count", "<u4"),
            ("registers", "u1", K),
        ]
    )
    out = np.zeros(len(group_ids), dtype=layout)
    out["preamble"] = _preamble(_HLL_PREINTS, 0, _HLL_MODE, flags=_OUT_OF_ORDER_FLAG)
    raw = out.view(np.uint8).reshape(-1)
    row = np.cumsum(in_hll)[pair_group] - 1
    first_register = row * layout.itemsize + _HLL_REGISTERS_START
    slot = (coupons & np.uint32(K - 1)).astype(np.int64)
    np.maximum.at(raw, first_register + slot, (coupons >> np.uint32(26)).astype(np.uint8))
    registers = out["registers"]
    histogram = np.bincount(
        (np.arange(len(group_ids))[:, None] * 64 + registers).reshape(-1),
        minlength=64 * len(group_ids),
    ).reshape(-1, 64)
    out["kxq0"] = histogram[:, :32] @ _INVERSE_POWERS_OF_2[:32]
    out["kxq1"] = histogram[:, 32:] @ _INVERSE_POWERS_OF_2[32:]
    out["at_cur_min"] = histogram[:, 0]
    return group_ids, raw.reshape(len(group_ids), -1)


def _preamble(pre_ints: int, lg_arr: int, mode: int, flags: int = 0) -> npt.NDArray[np.uint8]:
    return np.array(
        [pre_ints, _SER_VER, _FAMILY_ID, LG_K, lg_arr, flags, 0, mode | _TARGET_HLL_8],
        dtype=np.uint8,
    )


def _binary_array(
    groups: int, blocks: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]]
) -> pa.BinaryArray:
    """``groups`` entries: row ``i`` of a block at its ``group_ids[i]``, null where none."""
    parts = [
        pa.BinaryArray.from_buffers(
            pa.binary(),
            len(group_ids),
            [
                None,
                pa.py_buffer(np.arange(len(block) + 1, dtype=np.int32) * block.shape[1]),
                pa.py_buffer(block),
            ],
        )
        for group_ids, block in blocks
    ]
    position = np.full(groups, -1, dtype=np.int64)
    if blocks:
        position[np.concatenate([group_ids for group_ids, _ in blocks])] = np.arange(
            sum(len(group_ids) for group_ids, _ in blocks)
        )
    taken = pa.concat_arrays(parts or [pa.array([], pa.binary())]).take(
        pa.array(position, mask=position < 0)
    )
    if not isinstance(taken, pa.BinaryArray):
        raise AssertionError(f"expected a binary array, got {taken.type}")
    return taken


def sketches_by_group_via_library(
    group_index: npt.NDArray[np.int64],
    users: pa.Array | pa.ChunkedArray | pl.Series,
    groups: int,
) -> pa.BinaryArray:
    """:func:`sketches_by_group` with one DataSketches ``update`` per distinct (group, user).

    The definition of the bytes: kept for the tests, which hold :func:`sketches_by_group` to
    equal it, and for ``bench/hll_cost.py``, which measures the gain.
    """
    group_index = np.asarray(group_index, dtype=np.int64)
    _check(group_index, len(users), groups)
    pairs = _distinct_pairs(group_index, users)
    out: list[bytes | None] = [None] * groups
    if pairs.height:
        user_ids: list[str] = pairs["u"].to_list()
        counts = np.bincount(pairs["g"].to_numpy(), minlength=groups)
        ends = np.cumsum(counts)
        start = 0
        for group in np.flatnonzero(counts).tolist():
            end = int(ends[group])
            sketch = datasketches.hll_sketch(LG_K, TARGET)
            deque(map(sketch.update, user_ids[start:end]), maxlen=0)
            out[group] = _finish(sketch)
            start = end
    return pa.array(out, type=pa.binary())


def _union_into(merger: datasketches.hll_union, sketches: Iterable[bytes | None]) -> bytes:
    for data in sketches:
        if data is not None:
            merger.update(datasketches.hll_sketch.deserialize(data))
    return _finish(merger.get_result(TARGET))


def union(sketches: Iterable[bytes | None]) -> bytes:
    """The sketch of the union of the sets that ``sketches`` count (``None`` counts nothing).

    Reads any DataSketches HLL bytes (any target type or layout; a larger lg_k is reduced to
    :data:`LG_K`); the union of nothing is the empty sketch.
    """
    return _union_into(datasketches.hll_union(LG_K), sketches)


def union_many(
    rows: pa.ListArray | pa.ChunkedArray | Sequence[Sequence[bytes | None] | None],
) -> pa.BinaryArray:
    """:func:`union` of each row of a list-of-sketches column (a null row gives a null)."""
    items = rows.to_pylist() if isinstance(rows, pa.Array | pa.ChunkedArray) else rows
    merger = datasketches.hll_union(LG_K)
    out: list[bytes | None] = []
    for row in items:
        if row is None:
            out.append(None)
            continue
        merger.reset()
        out.append(_union_into(merger, row))
    return pa.array(out, type=pa.binary())


def compact(sketch: bytes) -> bytes:
    """The same sketch in its smallest form (compact layout, HLL_4 registers): about half
    the bytes of a busy HLL_8 sketch, for sketches kept in memory that rarely change again.
    Unions and estimates are the same (the registers are); ~40 µs, so not per event."""
    merger = datasketches.hll_union(LG_K)
    merger.update(datasketches.hll_sketch.deserialize(sketch))
    return bytes(merger.get_result(datasketches.HLL_4).serialize_compact())


def estimate(sketch: bytes | None) -> int:
    """Distinct users counted by ``sketch``, rounded half up as Spark's ``hll_sketch_estimate``."""
    if sketch is None:
        return 0
    value: float = datasketches.hll_sketch.deserialize(sketch).get_estimate()
    return math.floor(value + 0.5)


def estimates(
    sketches: pa.Array | pa.ChunkedArray | Iterable[bytes | None],
) -> npt.NDArray[np.int64]:
    """:func:`estimate` of each sketch (0 for a null)."""
    items = sketches.to_pylist() if isinstance(sketches, pa.Array | pa.ChunkedArray) else sketches
    return np.fromiter((estimate(s) for s in items), dtype=np.int64)


def empty() -> bytes:
    """The serialized sketch of no users."""
    return _EMPTY
