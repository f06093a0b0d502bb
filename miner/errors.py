"""Exceptions raised by miner.

Library code raises; the CLI maps these to one stderr line and an exit code.
"""

from __future__ import annotations

__all__ = ["MinerError", "DataError", "ConfigError", "ModelError"]


class MinerError(Exception):
    """Base class of every error miner raises on purpose."""


class DataError(MinerError, ValueError):
    """Input data is malformed; the message names the file and line (or the value)."""


class ConfigError(MinerError, ValueError):
    """A setting is out of range or two settings contradict each other."""


class ModelError(MinerError):
    """The encoder could not be found or loaded."""
