"""Training of the LSTI model: random windows of each user's training events, full-softmax loss,
model selection on the validation targets only (early stopping), the test targets never seen."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from encoders.batching import pad_batch
from encoders.metrics import summarize, target_ranks
from encoders.model import LSTIConfig, LSTIModel
from encoders.split import EvalCase, LeaveOneOut, Sequence

log = logging.getLogger("lsti.train")


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0
    patience: int = 4
    device: str | None = None
    max_minutes: float | None = None
    threads: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def pick_device(device: str | None = None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def random_windows(seqs: list[Sequence], max_len: int, rng: np.random.Generator) -> list[Sequence]:
    """One window of up to max_len+1 events per sequence, ending at a random point (augmentation)."""
    out = []
    for s in seqs:
        n = len(s.items)
        width = max_len + 1
        if n <= width:
            out.append(s)
            continue
        end = int(rng.integers(width, n + 1))
        out.append(Sequence(s.user, s.items[end - width : end], s.etypes[end - width : end], s.ts[end - width : end]))
    return out


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
        yield chunk, u @ item_vecs.T, g


def evaluate_lsti(model: LSTIModel, cases: list[EvalCase], device: str) -> dict[str, float]:
    ranks = [target_ranks(scores, chunk) for chunk, scores, _ in lsti_scores(model, cases, device)]
    return summarize(np.concatenate(ranks) if ranks else np.zeros(0))


def train_lsti(
    split: LeaveOneOut,
    text_vectors: np.ndarray,
    model_cfg: LSTIConfig,
    cfg: TrainConfig,
    progress: bool = True,
) -> tuple[LSTIModel, dict]:
    """Train on the split's training events; keep the weights with the best validation NDCG@10."""
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = pick_device(cfg.device)
    model = LSTIModel(model_cfg, torch.from_numpy(text_vectors)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    seqs = split.train_sequences()
    valid = split.cases("valid")
    best, best_state, bad_epochs, history = -1.0, None, 0, []
    start = time.perf_counter()
    n_batches = (len(seqs) + cfg.batch_size - 1) // cfg.batch_size
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        windows = random_windows(seqs, model_cfg.max_len, rng)
        perm = rng.permutation(len(windows))
        total = 0.0
        bar = tqdm(range(n_batches), desc=f"train {model_cfg.mode} epoch {epoch}", unit="batch",
                   disable=not progress, leave=False)
        for b in bar:
            batch = [windows[j] for j in perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
            items, etypes, ts, _ = pad_batch(batch, device)
            loss = model.loss(items, etypes, ts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            total += float(loss)
            bar.set_postfix(loss=f"{total / (b + 1):.3f}")
        bar.close()
        metrics = evaluate_lsti(model, valid, device)
        elapsed = time.perf_counter() - start
        history.append({"epoch": epoch, "loss": total / max(1, n_batches), "valid": metrics, "seconds": elapsed})
        msg = (f"epoch {epoch}: loss {total / max(1, n_batches):.4f} valid ndcg@10 {metrics['ndcg@10']:.4f} "
               f"hr@10 {metrics['hr@10']:.4f} ({elapsed:.0f}s)")
        log.info(msg)
        if progress:
            tqdm.write(msg)
        if metrics["ndcg@10"] > best:
            best, best_state, bad_epochs = metrics["ndcg@10"], copy.deepcopy(model.state_dict()), 0
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break
        if cfg.max_minutes and elapsed > cfg.max_minutes * 60:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    info = {"history": history, "best_valid_ndcg@10": best, "train_seconds": time.perf_counter() - start,
            "epochs_run": len(history), "device": device}
    return model, info
