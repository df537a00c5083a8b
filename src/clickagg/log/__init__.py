"""The log role: partitioned, offset-addressed, durable. Adapters live one per module."""
