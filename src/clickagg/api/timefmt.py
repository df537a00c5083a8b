"""Times at the HTTP edge: ISO-8601 or epoch seconds/ms in, ISO-8601 UTC with Z out."""

from __future__ import annotations

from datetime import UTC, datetime

from clickagg.api.errors import bad_request
from clickagg.config import parse_duration_ms
from clickagg.core.events import timestamp_ms


def parse_time(name: str, text: str) -> int:
    text = text.strip()
    try:
        if text.lstrip("-").replace(".", "", 1).isdigit():
            return timestamp_ms(float(text) if "." in text else int(text))
        return timestamp_ms(datetime.fromisoformat(text))
    except (ValueError, OverflowError):
        raise bad_request(
            f"{name}={text!r} is not a time: use ISO-8601 (2025-01-15T10:00:00Z) or epoch "
            "seconds/ms",
        ) from None


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
