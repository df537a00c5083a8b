"""The real-time counters role: sliding windows over the last hour, per ad."""
