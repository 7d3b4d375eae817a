"""Built-in tasks whose reward can be checked exactly (used by the default job and tests)."""
