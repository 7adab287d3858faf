"""The two kinds of failure a user can fix, each reported as one line without a traceback.

ConfigError  the composed config is wrong; found by validation before any compute starts
             (exit code 2).
EffrunError  a problem found while running that the user can fix: missing or bad data, a
             checkpoint or artifact that does not fit, training that diverged, a model a method
             cannot handle (exit code 1).

Any other exception is a bug in effrun (or in a library it calls) and shows its traceback.
"""


class ConfigError(Exception):
    """A config problem, reported as one line before any compute starts."""


class EffrunError(Exception):
    """A run-time problem the user can fix (data, checkpoints, diverged training), one line."""


class TrainingDiverged(EffrunError):
    """The loss, or a weight or statistic, became NaN or inf; the user fixes it with a lower lr
    or higher precision."""
