"""The package version (one place: the CLI, result files and the package metadata read it)."""

__version__ = "0.2.0"
