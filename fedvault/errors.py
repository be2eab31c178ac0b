"""Errors a user can act on: the CLI prints their message as one line and exits non-zero."""


class FedvaultError(Exception):
    """Base class for errors caused by input (config, files, plug-ins), not by a bug."""


class ConfigError(FedvaultError, ValueError):
    """A config key or value is unknown or invalid; the message names the key and the value."""


class TaskError(FedvaultError, ValueError):
    """A task cannot be found, loaded, or is not a task."""


class MissingPackageError(FedvaultError, ImportError):
    """An optional package a dataset or feature needs is not installed."""

    def __init__(self, package: str, needed_for: str) -> None:
        super().__init__(f"missing package '{package}' needed for {needed_for} (pip install {package})")
        self.package = package


class PartitionError(FedvaultError, ValueError):
    """The data cannot be partitioned as asked (for example more clients than samples)."""
