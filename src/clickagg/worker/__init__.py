"""Stream workers: one per partition, driving the pure processor between log and store."""
