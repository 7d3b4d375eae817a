"""rlfuse's Hydra config tree (YAML files), shipped inside the package.

Importing this package registers the structured-config schema the root config validates
against, so composing from ``pkg://rlfuse.conf`` works from any entry point.
"""

from rlfuse.config import register_configs

register_configs()
