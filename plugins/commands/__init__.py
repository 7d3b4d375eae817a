"""``rlfuse NAME`` sub-commands (entry-point group ``rlfuse.commands``)."""
