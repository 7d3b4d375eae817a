"""Advantage estimators: per-token advantages (and returns) from the rewards."""
