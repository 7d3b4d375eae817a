"""Rollout plugins: where a step's batch comes from (generation, or a dataset for offline algorithms)."""
