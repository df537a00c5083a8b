"""clickagg: exactly-once ad-click aggregation.

The package is laid out by concept: ``core`` is pure (no I/O) and holds the event model,
deduplication, windows and aggregation; ``log`` and ``store`` are backend roles, each a
Protocol with its adapters; ``worker``, ``api`` and ``cli`` are thin shells around the core.
"""

__version__ = "0.1.0"
