"""Process lifecycle: what runs where, and the one place that builds every role from settings.

``api/`` is HTTP only and ``worker/`` the stream logic; this package starts and watches the
processes (the worker supervisor) and holds the roles' registry (``roles``).
"""
