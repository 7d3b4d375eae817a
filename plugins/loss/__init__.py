"""Loss plugins: named loss terms; the core adds them, backpropagates and logs each."""
