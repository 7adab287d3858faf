"""effrun: one-command deep-learning efficiency studies."""

__version__ = "0.1.0"
