"""One exception type for input the user can fix: it is printed as a single line, never a traceback."""


class ConfigError(ValueError):
    """A setting or an input file is wrong. The message names the setting and says how to fix it."""
