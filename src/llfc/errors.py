"""User-facing errors.

Every problem caused by the user's input (names, files, shapes, values) raises a subclass of
:class:`LLFCError` whose message is one paragraph saying what is wrong and how to fix it. The CLI
prints that paragraph and exits with code 2; any other exception is a bug in llfc.
"""

from __future__ import annotations


class LLFCError(Exception):
    """Base class of all user-facing llfc errors (CLI exit code 2)."""


class UnknownNameError(LLFCError, KeyError):
    """A dataset, model, probe or experiment name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataNotFoundError(LLFCError, FileNotFoundError):
    """A dataset's files are not in the data root."""


class CheckpointError(LLFCError):
    """A checkpoint is missing, corrupted, or does not match the architecture."""


class IncompatibleModelsError(LLFCError):
    """Two models (or state dicts) cannot be paired: different architectures, keys or shapes."""


class NonFiniteWeightsError(LLFCError):
    """A state dict holds NaN or Inf values."""


class ConfigError(LLFCError, ValueError):
    """An invalid configuration value (e.g. an alpha outside [0, 1])."""


class OutputExistsError(LLFCError, FileExistsError):
    """The output directory already holds results and --overwrite was not given."""


class UnsupportedOperationError(LLFCError):
    """A model contains an operation that llfc has no handler for."""


class ReportError(LLFCError):
    """A folder that cannot be reported on: no results.json (run) and no run folders below it (sweep)."""


def unknown_name(kind: str, name: str, valid) -> UnknownNameError:
    """Build the standard "unknown <kind>" error listing the valid names."""
    valid = sorted(valid)
    return UnknownNameError(f"unknown {kind} {name!r}. Valid {kind}s: {', '.join(valid)}.")


class DistributedError(LLFCError):
    """A data-parallel (torchrun) run cannot go on: an unavailable backend, more processes than
    batches, ranks that disagree on the configuration or the checkpoints, or a rank that died."""
