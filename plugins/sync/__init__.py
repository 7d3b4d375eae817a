"""Sync plugins: run after every optimiser step (no-op, parameter averaging with peers, ...)."""
