"""``labeller=...``: who compares two answers (the ``compare`` hook)."""
