"""The keyed stage's corrections on Parquet: the archive's own machinery (manifests, atomic
publish, id index; ``clickagg.archive.parquet``) with the corrections' layout, under
``<data_dir>/keyed/corrections``. Its manifest ranges are keyed partitions' offsets: per
keyed partition it holds exactly the corrections made by consuming ``[0, archived)``."""

from __future__ import annotations

from pathlib import Path

from clickagg.archive.base import Correction
from clickagg.archive.parquet import CORRECTIONS, ParquetArchiveReader, ParquetArchiveWriter


def corrections_writer(
    directory: Path,
    *,
    flush_events: int = 200_000,
    flush_interval_ms: int = 2_000,
    compact_files: int = 8,
    compact_after_ms: int = 10 * 60_000,
    compact_grace_ms: int = 60 * 60_000,
) -> ParquetArchiveWriter:
    return ParquetArchiveWriter(
        directory,
        flush_events=flush_events,
        flush_interval_ms=flush_interval_ms,
        layout=CORRECTIONS,
        compact_files=compact_files,
        compact_after_ms=compact_after_ms,
        compact_grace_ms=compact_grace_ms,
    )


class ParquetCorrectionReader:
    """:class:`clickagg.archive.base.CorrectionReader` over a corrections directory (which
    need not exist: no corrections yet)."""

    def __init__(self, directory: Path) -> None:
        self._reader = ParquetArchiveReader(directory, layout=CORRECTIONS)

    def archived_offsets(self) -> dict[int, int]:
        return self._reader.archived_offsets()

    def corrections(self, event_id: str) -> list[Correction]:
        by_copy: dict[tuple[int, int], dict[str | None, Correction]] = {}
        for c in (Correction(**values) for values in self._reader.lookup(event_id)):
            # one per (copy, previous rule): a compaction's replaced file may still be read
            by_copy.setdefault((c.source_partition, c.source_offset), {})[c.previous_rule_id] = c
        return [c for key in sorted(by_copy) for c in _chain(by_copy[key])]

    def close(self) -> None:
        self._reader.close()


def _chain(by_previous: dict[str | None, Correction]) -> list[Correction]:
    """A copy's corrections in the order they were made: the correction (no previous
    rule), then each move from the rule that stood before it."""
    chain: list[Correction] = []
    current = by_previous.get(None)
    while current is not None and len(chain) < len(by_previous):
        chain.append(current)
        current = by_previous.get(current.rule_id)
    return chain
