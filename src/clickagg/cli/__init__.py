"""The terminal: ``clickagg serve | demo | query | trace``."""
