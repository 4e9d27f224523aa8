"""Training settings from parsed command-line flags, shared by `lsti train`, `lsti eval` and the demo."""

from __future__ import annotations

import argparse
import sys

RECIPES = ("reference", "lsti")  # `lsti eval --recipe` (sasrec)


def train_configs(args: argparse.Namespace, seed: int = 0) -> tuple:
    """(TrainConfig, model options) from the training flags a command was given; unset flags keep defaults.

    SASRec trains by pmixer/SASRec.pytorch's recipe unless `--recipe lsti` (`encoders.sasrec.REFERENCE_MODEL`
    and `REFERENCE_TRAIN`; `--recipe reference` asks for it explicitly); flags given explicitly still override
    it, and `--converge` keeps its stopping rule (its warmup is overridden by the recipe's 0). `--recipe lsti`
    is the shared loop's own recipe, the one of the sessions 1-5 sasrec rows."""
    from encoders.train import TrainConfig

    given, model = {}, {}
    recipe = getattr(args, "recipe", None)
    if recipe is None and getattr(args, "model", None) == "sasrec":
        recipe = "reference"  # its reference's recipe beat ours on validation (ml-1m, amazon-mi; BENCHMARKS.md)
    if recipe == "reference":
        if getattr(args, "model", "sasrec") != "sasrec":
            sys.exit("error: --recipe reference is SASRec's reference recipe (pmixer/SASRec.pytorch): use it with "
                     "--model sasrec")
        from encoders.sasrec import REFERENCE_MODEL, REFERENCE_TRAIN

        given, model = dict(REFERENCE_TRAIN), dict(REFERENCE_MODEL)
    given.update({k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "device", "max_minutes", "weight_decay",
                                                "patience", "schedule", "warmup", "windows", "batches", "decay_epochs")
                  if getattr(args, k, None) is not None})
    if getattr(args, "clip", None) is not None:
        given["clip"] = args.clip if args.clip > 0 else None  # --clip 0: no clipping
    model.update({k: getattr(args, k) for k in ("dim", "dropout", "aux_weight", "gate", "gate_bias", "id_dropout",
                                                "long_ids", "norm", "pad") if getattr(args, k, None) is not None})
    if getattr(args, "converge", False):
        return TrainConfig.converge(seed=seed, **given), model
    return TrainConfig(seed=seed, **given), model
