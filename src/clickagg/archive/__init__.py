"""The archive role: every decision with its fate, as Parquet. Adapters one per module."""
