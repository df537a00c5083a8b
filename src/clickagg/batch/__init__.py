"""The billing batch layer: final hours reconciled from the archive (see reconcile.py)."""
