"""Training settings from parsed command-line flags, shared by `lsti train`, `lsti eval` and the demo."""

from __future__ import annotations

import argparse


def train_configs(args: argparse.Namespace, seed: int = 0) -> tuple:
    """(TrainConfig, model options) from the training flags a command was given; unset flags keep defaults."""
    from encoders.train import TrainConfig

    given = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "device", "max_minutes", "weight_decay",
                                           "patience", "schedule") if getattr(args, k, None) is not None}
    model = {k: getattr(args, k) for k in ("dim", "dropout", "aux_weight", "gate", "gate_bias", "id_dropout")
             if getattr(args, k, None) is not None}
    if getattr(args, "converge", False):
        return TrainConfig.converge(seed=seed, **given), model
    return TrainConfig(seed=seed, **given), model
