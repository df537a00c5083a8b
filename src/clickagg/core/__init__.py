"""The pure core: events, ids, dedup, windows, sketches and aggregation. No I/O here."""
