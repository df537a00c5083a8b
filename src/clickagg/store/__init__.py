"""The aggregate-store role: minute rows, offsets, fates. Adapters live one per module."""
