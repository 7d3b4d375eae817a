"""Helpers shared by the data-reading plugins (not plugins): JSONL records, resumable streams, preference pairs."""
