"""Training: configuration, optimizer and schedule, checkpoints, metrics and the training loop."""

_EXPORTS = {"TrainConfig": "config", "parse_config": "config", "Trainer": "trainer", "TrainResult": "trainer",
            "main": "trainer", "train": "trainer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Lazy, so that light users (tools/plot_metrics.py) do not import torch and the model.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megaphi.train' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"megaphi.train.{_EXPORTS[name]}"), name)
