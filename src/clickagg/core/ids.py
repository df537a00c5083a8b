"""Event identity: fingerprints, synthesized ids and partitioning.

A click and an impression may legitimately share an id (a click often carries the id of
the impression it came from), so identity is (event type, id), not id alone. The 128-bit
fingerprint of that pair is what dedup remembers and what picks the partition; xxh3 is a
fixed, documented algorithm, so the mapping never changes across versions or machines.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import xxhash

CLICK = 0
IMPRESSION = 1
EVENT_TYPES = ("click", "impression")
EVENT_TYPE_CODES = {name: code for code, name in enumerate(EVENT_TYPES)}

_MASK64 = (1 << 64) - 1


def fingerprint(event_type: int, event_id: str) -> tuple[int, int]:
    """128-bit fingerprint of (type, id) as (high, low) unsigned 64-bit halves."""
    value: int = xxhash.xxh3_128_intdigest(event_id.encode(), seed=event_type)
    return value >> 64, value & _MASK64


def fingerprints(
    event_ids: Sequence[str], event_type: int
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """:func:`fingerprint` of many ids of one type, computed into one buffer."""
    digest = xxhash.xxh3_128_digest
    joined = b"".join([digest(i.encode(), event_type) for i in event_ids])
    halves = np.frombuffer(joined, dtype=">u8").reshape(-1, 2).astype(np.uint64)
    return np.ascontiguousarray(halves[:, 0]), np.ascontiguousarray(halves[:, 1])


def partition_of(fp_low: int, partitions: int) -> int:
    """Stable partition for a fingerprint: every copy of an event lands in one partition."""
    return fp_low % partitions


def partition_for_id(event_type: int, event_id: str, partitions: int) -> int:
    return partition_of(fingerprint(event_type, event_id)[1], partitions)


def synthesized_id(canonical_payload: bytes) -> str:
    """Id for an event sent without one: a hash of its canonical payload.

    A retransmitted copy has the same payload, hence the same id, hence deduplicates.
    """
    return "h" + xxhash.xxh3_128_hexdigest(canonical_payload)


def user_hash(user_id: str | None) -> int:
    """64-bit hash of a user id for the unique-user sketch; 0 means "no user"."""
    if user_id is None:
        return 0
    return xxhash.xxh3_64_intdigest(user_id.encode()) or 1
