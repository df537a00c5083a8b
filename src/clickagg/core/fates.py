"""Every event gets exactly one recorded fate; these are their names."""

from __future__ import annotations

COUNTED = "counted"
DUPLICATE = "duplicate"
LATE = "late"
INVALID = "invalid"
REJECTED = "rejected"  # refused at ingest: never entered the log
