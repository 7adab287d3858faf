"""effrun: one-command deep-learning efficiency studies."""

__version__ = "0.2.0"  # 0.2: the memory loader draws augmentation per (seed, epoch, batch, rank)
