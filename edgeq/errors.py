"""One error family for edgeq. The CLI alone turns these into exit codes and messages.

Exit codes (documented in the README):
    0  success, every artifact within budget
    1  unexpected internal error (a bug: please report it with the traceback)
    2  usage error: bad command-line option or project file
    3  bad input: model source, inputs or data that cannot be loaded
    4  conversion failed or was refused (unsupported op, layer or target request)
    5  validation could not run (runtime missing or the artifact failed to execute)
    6  over budget: the artifact was written and validated, but its drift exceeds a budget
"""

from __future__ import annotations


class EdgeqError(Exception):
    """Base of every error edgeq raises on purpose; `exit_code` is what the CLI returns."""

    exit_code = 1


class UsageError(EdgeqError):
    """A command-line option, input spec or project-file key is malformed."""

    exit_code = 2


class SourceError(EdgeqError):
    """A model source, weights file or data file cannot be loaded as given."""

    exit_code = 3


class ConversionError(EdgeqError):
    """A converter rejected the model, or the target cannot run what was asked."""

    exit_code = 4


class ValidationError(EdgeqError):
    """The artifact could not be executed in its runtime."""

    exit_code = 5


class BudgetExceeded(EdgeqError):
    """The artifact ran, but its drift is over the budget. The bundle is kept."""

    exit_code = 6
