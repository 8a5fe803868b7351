"""The one error type for configurations that contradict themselves."""


class ConfigError(ValueError):
    """A configuration that contradicts itself; the message names the fields."""
