"""Domain errors. Each says what value was wrong and what was expected, so the CLI can print it
without a traceback."""

from __future__ import annotations


class BBFLError(Exception):
    """Base class for errors that the CLI reports as a one-line message."""


class DataError(BBFLError, ValueError):
    """A data file or task specification is malformed (names the file and what was expected)."""


class ConfigError(BBFLError, ValueError):
    """A configuration value is out of range or inconsistent with another."""


class BudgetExceeded(BBFLError, RuntimeError):
    """A black box was asked for more queries than its budget allows."""


class CheckpointError(BBFLError, RuntimeError):
    """A checkpoint does not match the run it is asked to resume, or a run-directory file is truncated or garbled."""


class EndpointError(BBFLError, RuntimeError):
    """A remote model endpoint kept failing (after retries) or answered something unusable (names what)."""
