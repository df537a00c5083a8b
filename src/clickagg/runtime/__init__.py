"""Process lifecycle: what runs where, and the one place that builds every role from settings.

``api/`` is HTTP only and ``worker/`` the stream logic; this package starts and watches the
processes (the worker supervisor, ``services``), runs what the process owning the log does
beside serving (retention, ``maintenance``) and holds the roles' registry (``roles``).
"""
