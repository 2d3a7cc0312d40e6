"""Expected, user-facing errors: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class PipelineError(Exception):
    """An expected failure (bad input, bad config, network, checksum) with a one-line message."""


class ConfigError(PipelineError, ValueError):
    """A configuration (build, training or model) is invalid."""


class DownloadError(PipelineError):
    """A download failed (HTTP error, retries exhausted, checksum mismatch)."""


class InputFormatError(PipelineError):
    """An input file is malformed; the message names the file and the record."""


class OutputExistsError(PipelineError, FileExistsError):
    """The output path exists and overwriting was not asked for."""
