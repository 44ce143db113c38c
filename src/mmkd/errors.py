"""Exceptions raised by mmkd.

Every error a user can cause derives from `MmkdError`, so the command line can print
its message without a traceback and exit with a usage status.
"""


class MmkdError(Exception):
    """Base class of every error mmkd raises on bad input or configuration."""


class ConfigError(MmkdError):
    """The YAML config is malformed, has unknown keys or out-of-range values."""


class DataError(MmkdError):
    """A manifest or a file it names cannot be read or decoded."""


class PluginError(MmkdError):
    """Base class of plugin registry errors."""


class UnknownPluginError(PluginError, KeyError):
    """No plugin of the requested kind has the requested name."""

    def __str__(self) -> str:
        # KeyError quotes its argument; show the message as written.
        return str(self.args[0]) if self.args else ""


class DuplicatePluginError(PluginError):
    """Two plugins of one kind claim the same name."""


class PluginLoadError(PluginError):
    """A plugin was found but could not be imported or does not fit the plugin API."""


class ExportError(MmkdError):
    """The exported ONNX model is invalid or disagrees with PyTorch."""
