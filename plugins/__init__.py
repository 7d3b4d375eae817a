"""rlfuse's built-in plugins.

Each module here is registered under the ``rlfuse`` entry-point group in rlfuse's
pyproject, exactly as a third-party package registers its own, and selected by that name in
config. None of them is special to the core.
"""
