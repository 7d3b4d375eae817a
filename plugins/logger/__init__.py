"""Logger plugins: where metrics go (``logger=[jsonl,console,plot]``)."""
