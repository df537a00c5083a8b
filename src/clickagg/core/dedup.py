"""Exact set of 128-bit event fingerprints, bucketed by event minute so minutes expire whole.

Layout: per minute bucket, a few immutable "runs", each a pair of uint64 arrays (high, low)
sorted lexicographically by (high, low). Nothing else is stored per id, so at rest the set
holds exactly 16 bytes per id and expiring a minute drops its arrays in O(1).

Why this shape, and what it costs (b = batch size, m = ids in a run, B = live buckets):

* A batch is sorted once, O(b log b). Sorted, its repeats are adjacent (one compare finds
  them) and its probes walk each run in order, which keeps searchsorted cache-friendly.
* Membership is one ``searchsorted`` on ``high`` per run, the smaller side searched into the
  larger: O(min(b log m, m log b)). A call probes every run of every bucket, so at least B
  probes: that is the price of O(1) expiry with no per-id bucket tag (a tag would break
  16 bytes per id). In a stream most minutes are cold, and a bucket a call does not touch
  is folded into a single run, so a call costs about B + (runs of the hot minutes) probes.
* ``high`` is a hash half: equal highs with different lows are rare but possible (and easy
  to craft), and exactness never relies on their absence. A probe that lands on an equal
  high with a smaller low is refined by a vectorized bisection on ``low`` inside that
  equal-high range, O(log k) numpy passes over only those probes; ties inside a batch are
  re-sorted by lexsort on just the tied elements.
* Each call adds one sorted run per touched bucket. Runs are merged in linear time (the
  smaller run is placed into the larger by its lower bounds; no re-sort) while the older
  neighbour is less than ``_RATIO`` times the newer, or a bucket has over ``_MAX_RUNS``.
  Sizes stay geometric: O(log m) runs per bucket, each id re-copied O(log m) times.
* Transient memory: a merge briefly holds both inputs and the output (16 bytes per id of
  that one bucket, never of the whole set) plus a 1-byte-per-id mask. A snapshot is one
  copy of the ids (16 bytes per id) into the returned bytes.
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]
Run = tuple[U64, U64]

_MINUTE_MS = 60_000
_RATIO = 4
_MAX_RUNS = 8
_MAGIC = b"CAIDSET1"
_HEAD = struct.Struct("<8sQ")
_BUCKET = struct.Struct("<qQ")
_COUNT = struct.Struct("<Q")
_LE_U64 = np.dtype("<u8")


def _lex_order(h: U64, lo: U64) -> npt.NDArray[np.intp]:
    """Permutation sorting (h, lo) lexicographically: sort by h, re-sort equal-h groups."""
    order = np.argsort(h)
    sh = h[order]
    eq = np.flatnonzero(sh[1:] == sh[:-1])
    if eq.size:
        pos = np.union1d(eq, eq + 1)
        sub = order[pos]
        order[pos] = sub[np.lexsort((lo[sub], h[sub]))]
    return order


def _probe(
    rh: U64, rl: U64, kh: U64, kl: U64
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
    """Lexicographic lower bound of each key (kh, kl) in the sorted run, and whether found."""
    n = len(rh)
    idx = np.searchsorted(rh, kh)
    hit = np.zeros(len(kh), dtype=np.bool_)
    if n == 0 or len(kh) == 0:
        return idx, hit
    cand = np.flatnonzero(np.take(rh, idx, mode="clip") == kh)
    if cand.size == 0:
        return idx, hit
    got, want = rl[idx[cand]], kl[cand]
    hit[cand] = got == want
    amb = cand[got < want]  # equal high, smaller low: the key may sit further right
    if amb.size:
        lo = idx[amb] + 1
        end = np.searchsorted(rh, kh[amb], side="right")
        hi, key = end.copy(), kl[amb]
        while True:
            act = np.flatnonzero(lo < hi)
            if act.size == 0:
                break
            mid = (lo[act] + hi[act]) // 2
            less = rl[mid] < key[act]
            lo[act] = np.where(less, mid + 1, lo[act])
            hi[act] = np.where(less, hi[act], mid)
        idx[amb] = lo
        hit[amb] = (lo < end) & (np.take(rl, lo, mode="clip") == key)
    return idx, hit


def _contains(run: Run, kh: U64, kl: U64) -> npt.NDArray[np.bool_]:
    """Which keys (sorted, distinct pairs) are in the run."""
    rh, rl = run
    if len(rh) >= len(kh):
        return _probe(rh, rl, kh, kl)[1]
    idx, hit = _probe(kh, kl, rh, rl)  # each run id matches at most one distinct key
    found = np.zeros(len(kh), dtype=np.bool_)
    found[idx[hit]] = True
    return found


def _merge(a: Run, b: Run) -> Run:
    """Merge two sorted, disjoint runs in linear time (placement by lower bound)."""
    if len(a[0]) < len(b[0]):
        a, b = b, a
    if len(b[0]) == 0:
        return a
    n, m = len(a[0]), len(b[0])
    pos = _probe(a[0], a[1], b[0], b[1])[0] + np.arange(m)
    from_a = np.ones(n + m, dtype=np.bool_)
    from_a[pos] = False
    out: list[U64] = []
    for xa, xb in zip(a, b, strict=True):
        x = np.empty(n + m, dtype=np.uint64)
        x[pos] = xb
        x[from_a] = xa
        out.append(x)
    return out[0], out[1]


class IdSet:
    """Exact set of (high, low) fingerprints in minute buckets; see the module docstring."""

    def __init__(self) -> None:
        self._buckets: dict[int, list[Run]] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes + lo.nbytes for runs in self._buckets.values() for h, lo in runs)

    def minutes(self) -> list[int]:
        return sorted(self._buckets)

    def check_and_add(
        self, fp_high: U64, fp_low: U64, minute_ms: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.bool_]:
        """Per position: already held, or seen earlier in this call. Adds the rest."""
        h = np.asarray(fp_high, dtype=np.uint64)
        lo = np.asarray(fp_low, dtype=np.uint64)
        mins = np.asarray(minute_ms, dtype=np.int64)
        if h.ndim != 1 or h.shape != lo.shape or h.shape != mins.shape:
            raise ValueError("fp_high, fp_low and minute_ms must be 1-D and of equal length")
        if np.any(mins % _MINUTE_MS):
            raise ValueError("minute_ms must be multiples of 60000")
        dup = np.ones(len(h), dtype=np.bool_)
        if len(h) == 0:
            return dup
        order = _lex_order(h, lo)
        sh, sl = h[order], lo[order]
        same = (sh[1:] == sh[:-1]) & (sl[1:] == sl[:-1])
        if same.any():  # keep the earliest position of each repeated pair
            starts = np.flatnonzero(np.concatenate(([True], ~same)))
            rep = np.minimum.reduceat(order, starts)
            sh, sl = sh[starts], sl[starts]
        else:
            rep = order
        found = np.zeros(len(sh), dtype=np.bool_)
        for runs in self._buckets.values():
            for run in runs:
                found |= _contains(run, sh, sl)
        new = np.flatnonzero(~found)
        if new.size == 0:
            return dup
        dup[rep[new]] = False
        nh, nl, nm = sh[new], sl[new], mins[rep[new]]
        touched: list[int] = np.unique(nm).tolist()
        for minute in touched:
            if len(touched) == 1:
                self._add_run(minute, (nh, nl))
            else:
                sel = nm == minute
                self._add_run(minute, (nh[sel], nl[sel]))
        self._len += int(new.size)
        for minute in self._buckets.keys() - set(touched):
            if len(self._buckets[minute]) > 1:
                self._buckets[minute] = [self._fold(self._buckets[minute])]
        return dup

    def _add_run(self, minute: int, run: Run) -> None:
        runs = self._buckets.setdefault(minute, [])
        runs.append(run)
        while len(runs) > 1 and (
            len(runs) > _MAX_RUNS or len(runs[-2][0]) < _RATIO * len(runs[-1][0])
        ):
            b = runs.pop()
            runs[-1] = _merge(runs[-1], b)

    @staticmethod
    def _fold(runs: list[Run]) -> Run:
        runs = list(runs)
        while len(runs) > 1:
            b = runs.pop()
            runs[-1] = _merge(runs[-1], b)
        return runs[0]

    def expire_before(self, minute_ms: int) -> int:
        """Forget every bucket whose minute is before ``minute_ms``; returns ids forgotten."""
        gone = 0
        for minute in [m for m in self._buckets if m < minute_ms]:
            gone += sum(len(h) for h, _ in self._buckets.pop(minute))
        self._len -= gone
        return gone

    def snapshot(self) -> bytes:
        """Header, then per bucket (minute, run count) and per run (count, highs, lows), LE."""
        parts: list[bytes | memoryview] = [_HEAD.pack(_MAGIC, len(self._buckets))]
        for minute in self.minutes():
            runs = self._buckets[minute]
            parts.append(_BUCKET.pack(minute, len(runs)))
            for h, lo in runs:
                parts.append(_COUNT.pack(len(h)))
                parts.append(h.astype(_LE_U64, copy=False).data)  # no copy on LE hosts
                parts.append(lo.astype(_LE_U64, copy=False).data)
        return b"".join(parts)

    @classmethod
    def restore(cls, data: bytes) -> IdSet:
        view = memoryview(data)
        try:
            magic, nbuckets = _HEAD.unpack_from(view, 0)
            if magic != _MAGIC:
                raise ValueError("not an IdSet snapshot")
            at = _HEAD.size
            out = cls()
            for _ in range(nbuckets):
                minute, nruns = _BUCKET.unpack_from(view, at)
                if minute in out._buckets:
                    raise ValueError(f"minute {minute} twice in IdSet snapshot")
                at += _BUCKET.size
                runs: list[Run] = []
                for _ in range(nruns):
                    (count,) = _COUNT.unpack_from(view, at)
                    at += _COUNT.size
                    arrays = []
                    for _ in range(2):
                        arr = np.frombuffer(view, dtype=_LE_U64, count=count, offset=at)
                        arrays.append(arr.astype(np.uint64))  # copy: own, native order
                        at += 8 * count
                    runs.append((arrays[0], arrays[1]))
                    out._len += count
                out._buckets[minute] = runs
        except struct.error as exc:
            raise ValueError(f"truncated IdSet snapshot: {exc}") from exc
        if at != len(view):
            raise ValueError("trailing bytes after IdSet snapshot")
        return out
