"""Times at the HTTP edge: ISO-8601 or epoch seconds/ms in, ISO-8601 UTC with Z out."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from clickagg.api.errors import bad_request
from clickagg.config import parse_duration_ms
from clickagg.core.events import timestamp_ms

LATEST_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last time ISO-8601 can say


_DECIMAL = re.compile(r"[0-9]{1,14}\.[0-9]{1,6}")
"""What the OpenAPI document allows of a decimal epoch time (ASCII digits only)."""


def parse_time(name: str, text: str) -> int:
    text = text.strip()
    try:
        if text.lstrip("-").replace(".", "", 1).isdigit():
            if "." in text and not _DECIMAL.fullmatch(text):
                raise bad_request(
                    f"{name}={text!r}: a decimal time has at most 14 digits before the point "
                    "and 6 after (microseconds)"
                )
            ms = timestamp_ms(float(text) if "." in text else int(text))
        else:
            ms = timestamp_ms(datetime.fromisoformat(text))
    except (ValueError, OverflowError):
        raise bad_request(
            f"{name}={text!r} is not a time: use ISO-8601 (2025-01-15T10:00:00Z) or epoch "
            "seconds/ms",
        ) from None
    if not 0 <= ms <= LATEST_MS:
        raise bad_request(f"{name}={text!r} is out of range (1970-01-01 to 9999-12-31)")
    return ms


def parse_span(name: str, text: str) -> int:
    try:
        return parse_duration_ms(text)
    except ValueError as exc:
        raise bad_request(f"{name}: {exc}") from None


def iso(ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    if ms % 1000:
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
