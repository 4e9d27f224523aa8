"""Training of the sequence models (LSTI and SASRec): random windows of each user's training events,
full-softmax loss, warmup + cosine learning rate, model selection on the validation targets only
(early stopping), the test targets never seen.

The defaults are the LSTI recipe. SASRec's reference recipe (pmixer/SASRec.pytorch) differs in the loop
too, and each difference is a TrainConfig field: `windows="last"` (always each user's last max_len+1
events instead of a random window), `batches="shuffled"` (a plain permutation cut every batch_size
instead of length-bucketed batches), `clip=None` (no gradient clipping) and `warmup=0`."""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from encoders.batching import pad_batch
from encoders.metrics import summarize, target_ranks
from encoders.model import LSTIConfig, LSTIModel
from encoders.split import EvalCase, LeaveOneOut, Sequence

log = logging.getLogger("lsti.train")


# Base learning rates tuned on ml-1m VALIDATION (warmup + cosine): the LSTM model wants a high rate, the
# transformer stalls at the popularity plateau with it and keeps the reference's 1e-3.
DEFAULT_LR = {"lsti": 2e-2, "sasrec": 1e-3, "gru4rec": 1e-3}
WINDOWS = ("random", "last")
BATCHES = ("bucketed", "shuffled")


@dataclass
class TrainConfig:
    """Defaults fit ml-1m (3k users, 200-event windows) in under 15 minutes on 2 CPU cores."""

    epochs: int = 20
    batch_size: int = 64
    lr: float | None = None  # None = DEFAULT_LR of the model family
    weight_decay: float = 0.0
    seed: int = 0
    patience: int = 10  # epochs without a better valid NDCG@10; the cosine tail is often best, so be lenient
    device: str | None = None
    max_minutes: float | None = 14.0
    threads: int | None = None
    warmup: float = 0.05  # fraction of all steps with a linear warmup (0 = none)
    schedule: str = "cosine"  # constant | cosine (decays to 0 over `epochs`)
    windows: str = "random"  # random (a random window of long users, augmentation) | last (their last events)
    batches: str = "bucketed"  # bucketed (similar lengths, less padding) | shuffled (a plain permutation)
    clip: float | None = 5.0  # max gradient norm; None = no clipping
    # After the plateau: back to the best weights, then this many more epochs with the rate annealed linearly
    # to 0 (0 = stop at the plateau). A constant rate tops out noisily; the anneal collects what it left.
    decay_epochs: int = 0

    def __post_init__(self):
        if self.windows not in WINDOWS:
            raise ValueError(f"TrainConfig.windows must be one of {WINDOWS}, not {self.windows!r}")
        if self.batches not in BATCHES:
            raise ValueError(f"TrainConfig.batches must be one of {BATCHES}, not {self.batches!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def converge(cls, **given) -> TrainConfig:
        """The one rule for 'trained to convergence', the same for every model: a constant rate after the
        warmup until validation NDCG@10 has not improved for 20 epochs, then from the best weights 10 epochs
        with the rate annealed to 0 (a model tuned with a decaying rate, like the LSTI ones, tops out lower and
        noisier at a constant one), a 4-hour cap that should never be what stops a run on ml-1m
        (`stop_reason` in the result says which did)."""
        return cls(**{"epochs": 1000, "patience": 20, "schedule": "constant", "max_minutes": 240.0,
                      "warmup": 0.002, "decay_epochs": 10, **given})

    def resolved(self, family: str) -> TrainConfig:
        """A copy with the family's default lr filled in (the artifact records the rate actually used)."""
        return replace(self, lr=self.lr if self.lr is not None else DEFAULT_LR[family])


def pick_device(device: str | None = None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def random_windows(seqs: list[Sequence], max_len: int, rng: np.random.Generator,
                   last: bool = False) -> list[Sequence]:
    """One window of up to max_len+1 events per sequence, ending at a random point (augmentation), or with
    `last` at the sequence's end (the reference SASRec's `train[-201:]`; no random number drawn)."""
    out = []
    for s in seqs:
        n = len(s.items)
        width = max_len + 1
        if n <= width:
            out.append(s)
            continue
        end = n if last else int(rng.integers(width, n + 1))
        out.append(Sequence(s.user, s.items[end - width : end], s.etypes[end - width : end], s.ts[end - width : end]))
    return out


def length_batches(windows: list[Sequence], batch_size: int, rng: np.random.Generator) -> list[list[Sequence]]:
    """Shuffled batches of similar lengths: less padding, so about half the compute per epoch.

    Windows are shuffled, cut into pools of 8 batches, each pool sorted by length; then the batches
    themselves are shuffled, so every epoch still sees the users in a new random order.
    """
    perm = rng.permutation(len(windows))
    pool = batch_size * 8
    batches = []
    for p in range(0, len(perm), pool):
        chunk = sorted(perm[p : p + pool], key=lambda j: len(windows[j].items))
        batches += [[windows[j] for j in chunk[b : b + batch_size]] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def shuffled_batches(windows: list[Sequence], batch_size: int, rng: np.random.Generator) -> list[list[Sequence]]:
    """A random permutation cut every `batch_size` (the reference's batches: each user once, any lengths)."""
    perm = rng.permutation(len(windows))
    return [[windows[j] for j in perm[b : b + batch_size]] for b in range(0, len(perm), batch_size)]


def make_batches(windows: list[Sequence], cfg: TrainConfig, rng: np.random.Generator) -> list[list[Sequence]]:
    return (shuffled_batches if cfg.batches == "shuffled" else length_batches)(windows, cfg.batch_size, rng)


def lr_factor(progress: float, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at `progress` in [0, 1]: linear warmup, then constant or cosine to 0."""
    if progress < cfg.warmup:
        return max(progress / cfg.warmup, 1e-3)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - cfg.warmup) / max(1e-9, 1.0 - cfg.warmup))))
    return 1.0


@torch.no_grad()
def lsti_scores(model: LSTIModel, cases: list[EvalCase], device: str, batch_size: int = 256):
    """Yield (cases batch, scores [B, n_items+1], gates) using each user's full history."""
    model.eval()
    item_vecs = model.item_vectors()
    order = sorted(range(len(cases)), key=lambda i: len(cases[i].history.items))
    for i in range(0, len(order), batch_size):
        chunk = [cases[j] for j in order[i : i + batch_size]]
        items, etypes, ts, lengths = pad_batch([c.history for c in chunk], device)
        u, g = model.final_states(items, etypes, ts, lengths)
        yield chunk, model.score_users(u, item_vecs), g


def lsti_ranks(model: LSTIModel, cases: list[EvalCase], device: str) -> np.ndarray:
    """Target ranks in the order of `cases` (lsti_scores batches them by history length)."""
    ranks = np.zeros(len(cases), dtype=np.int64)
    pos = {id(c): i for i, c in enumerate(cases)}
    for chunk, scores, _ in lsti_scores(model, cases, device):
        ranks[[pos[id(c)] for c in chunk]] = target_ranks(scores, chunk)
    return ranks


def evaluate_lsti(model: LSTIModel, cases: list[EvalCase], device: str) -> dict[str, float]:
    return summarize(lsti_ranks(model, cases, device))


def fit(
    model: nn.Module,
    batch_loss: Callable[[list[Sequence]], torch.Tensor],
    evaluate: Callable[[], dict[str, float]],
    split: LeaveOneOut,
    max_len: int,
    cfg: TrainConfig,
    desc: str,
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """The shared loop: same windows, batches, optimiser, schedule and early stopping for every model."""
    from tqdm import tqdm

    assert cfg.lr is not None, "resolve the learning rate first (TrainConfig.resolved)"
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    seqs = split.train_sequences()
    best, best_state, bad_epochs, history = -1.0, None, 0, []
    start = time.perf_counter()
    n_batches = len(make_batches(seqs, cfg, np.random.default_rng(0)))
    total_steps, step = cfg.epochs * n_batches, 0
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    out_of_time = False
    interrupted, done = False, 0
    decay_from: int | None = None  # the step the final anneal started at (after the plateau)
    anneal_steps, annealed = cfg.decay_epochs * n_batches, False
    plateau: dict | None = None
    try:  # Ctrl-C (SIGINT) ends a long run like a plateau would: the best epoch so far is evaluated
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            batches = make_batches(random_windows(seqs, max_len, rng, cfg.windows == "last"), cfg, rng)
            total, done = 0.0, 0
            bar = tqdm(batches, desc=f"train {desc} epoch {epoch}/{cfg.epochs}", unit="batch", disable=not progress,
                       leave=False)
            for batch in bar:
                # Progress is steps done or time used, whichever is further: on a slow or busy machine the
                # schedule still anneals to 0 by `max_minutes` instead of being cut off at a high rate.
                frac = step / total_steps
                if budget:
                    frac = max(frac, (time.perf_counter() - start) / budget)
                    if frac >= 1.0:
                        out_of_time = True
                        break
                factor = lr_factor(frac, cfg)
                if decay_from is not None:
                    factor = max(0.0, 1.0 - (step - decay_from) / anneal_steps)
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * factor
                loss = batch_loss(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                opt.step()
                step += 1
                total, done = total + loss.item(), done + 1
                bar.set_postfix(loss=f"{total / done:.3f}")
            bar.close()
            if done == 0:  # the time budget ran out before this epoch's first step: nothing new to evaluate
                break
            metrics = evaluate()
            elapsed = time.perf_counter() - start
            history.append({"epoch": epoch, "loss": total / max(1, done), "valid": metrics, "seconds": elapsed})
            msg = (f"{desc} epoch {epoch}: loss {total / max(1, done):.4f} valid ndcg@10 {metrics['ndcg@10']:.4f} "
                   f"hr@10 {metrics['hr@10']:.4f} ({elapsed:.0f}s)")
            log.info(msg)
            if progress:
                tqdm.write(msg, file=sys.stderr)  # stdout is for results (`lsti eval --json`)
            if metrics["ndcg@10"] > best:
                best, best_state, bad_epochs = metrics["ndcg@10"], copy.deepcopy(model.state_dict()), 0
            else:
                bad_epochs += 1
                if bad_epochs >= cfg.patience and decay_from is None and cfg.decay_epochs > 0:
                    plateau = {"epoch": epoch, "best_valid_ndcg@10": best}
                    log.info("%s: plateau after epoch %d (best valid ndcg@10 %.4f); back to the best weights, "
                             "then %d epochs annealed to 0", desc, epoch, best, cfg.decay_epochs)
                    model.load_state_dict(best_state)
                    decay_from, bad_epochs = step, 0
                elif bad_epochs >= cfg.patience:
                    break
            if decay_from is not None and step - decay_from >= anneal_steps:
                annealed = True
                break
            if out_of_time:
                break
    except KeyboardInterrupt:
        interrupted = True
        log.warning("training interrupted after %d epochs; keeping the best so far", len(history))
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    stop = ("interrupted" if interrupted else "plateau, then anneal" if annealed
            else "plateau" if bad_epochs >= cfg.patience
            else "time cap" if out_of_time or done == 0 else "max epochs")
    info = {"history": history, "best_valid_ndcg@10": best, "train_seconds": time.perf_counter() - start,
            "stop_reason": stop, "patience": cfg.patience, "plateau": plateau,
            "epochs_run": len(history),
            "best_epoch": int(np.argmax([h["valid"]["ndcg@10"] for h in history])) + 1 if history else 0}
    return model, info


def train_lsti(
    split: LeaveOneOut,
    text_vectors: np.ndarray,
    model_cfg: LSTIConfig,
    cfg: TrainConfig,
    progress: bool = True,
) -> tuple[LSTIModel, dict]:
    """Train on the split's training events; keep the weights with the best validation NDCG@10."""
    cfg = cfg.resolved("lsti")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    model = LSTIModel(model_cfg, torch.from_numpy(text_vectors))
    model.hidden_items = torch.from_numpy(split.hidden_items)
    model = model.to(device)
    valid = split.cases("valid")

    def batch_loss(batch: list[Sequence]) -> torch.Tensor:
        items, etypes, ts, _ = pad_batch(batch, device)
        return model.loss(items, etypes, ts)

    model, info = fit(model, batch_loss, lambda: evaluate_lsti(model, valid, device), split, model_cfg.max_len,
                      cfg, model_cfg.mode, progress)
    info.update(device=device, lr=cfg.lr)
    return model, info
