"""Reward plugins: every selected one scores the batch; the core sums them with their weights."""
