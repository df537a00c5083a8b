"""The registry hands both archive writers (decisions and corrections) the settings'
flush and compaction values, each writer its own directory and layout."""

from __future__ import annotations

from pathlib import Path

from clickagg.archive.parquet import CORRECTIONS, DECISIONS, ParquetArchiveWriter
from clickagg.config import Settings
from clickagg.runtime import roles


def test_both_archive_writers_take_the_settings_flush_and_compaction_values(
    tmp_path: Path,
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        archive_flush_events=1_234,
        archive_flush_interval_ms=5_678,
        archive_compact_files=3,
        archive_compact_after_ms=91_000,
        archive_compact_grace_ms=92_000,
    )
    decisions = roles.archive_writer(settings)
    corrections = roles.correction_writer(settings)
    try:
        for writer, directory, layout in (
            (decisions, settings.archive_dir, DECISIONS),
            (corrections, settings.corrections_dir, CORRECTIONS),
        ):
            assert isinstance(writer, ParquetArchiveWriter)
            assert (writer.directory, writer.layout) == (directory, layout)
            assert (writer.flush_events, writer.flush_interval_ms) == (1_234, 5_678)
            assert (writer.compact_files, writer.compact_after_ms) == (3, 91_000)
            assert writer.compact_grace_ms == 92_000
    finally:
        decisions.close()
        corrections.close()
