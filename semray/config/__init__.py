"""Validated run configuration: one pydantic model per concern, YAML in, pydantic out.

Every model forbids unknown keys and validates assignments, so a typo or an out-of-range value is a
:class:`~semray.config.base.ConfigError` that names the field, raised before any work starts.
"""

from semray.config.base import ConfigError, StrictModel, dump_yaml, flatten, load_config

__all__ = ["ConfigError", "StrictModel", "dump_yaml", "flatten", "load_config"]
