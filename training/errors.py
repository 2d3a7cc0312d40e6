"""The base class of errors that are the user's to fix (reported without a traceback)."""

from __future__ import annotations

from pipeline.errors import PipelineError


class UserError(PipelineError):
    """An expected error (bad input, missing file, bad config): ``esm2-train`` prints one line."""


class RankError(UserError):
    """An error met by one rank only (a damaged shard it read): that rank reports it."""

    rank_local = True


class StoppedByPeer(UserError):
    """This rank stops because another rank failed and reports the cause (nothing printed)."""

    silent = True
