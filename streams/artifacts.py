"""Versioned model artifacts: `artifacts/<version>/{manifest.json, model.pt, items.json, index.faiss,
long_term.npy, users.json}`. The manifest holds sha256 checksums; a folder whose files do not match
is refused. `CURRENT` names the live version and is replaced atomically."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from encoders.data_check import file_sha256
from encoders.model import LSTIConfig, LSTIModel
from encoders.online import OnlineModel
from index import ItemIndex

FILES = ("model.pt", "items.json", "index.faiss", "long_term.npy", "users.json")


def default_artifacts_dir() -> Path:
    env = os.environ.get("LSTI_ARTIFACTS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "artifacts"


sha256 = file_sha256


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class BadArtifact(RuntimeError):
    """Checksum mismatch, missing file or wrong dimension: never goes live."""


def write_artifact(root: Path, version: str, model: LSTIModel, item_ids: list[str], index: ItemIndex,
                   long_users: list[str], long_vectors: np.ndarray, meta: dict,
                   popularity: np.ndarray | None = None) -> Path:
    """Write into a temp folder, checksum, then rename into place: a half-written version never exists.

    `popularity`: events per item code (what unknown users are recommended when they have no long-term
    vector either); stored beside the ids in items.json."""
    final = root / version
    tmp = root / f".{version}.tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=False)
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict()}, tmp / "model.pt")
    items_doc: dict = {"item_ids": item_ids}
    if popularity is not None:
        if len(popularity) != len(item_ids):
            raise ValueError(f"popularity has {len(popularity)} entries for {len(item_ids)} item codes")
        items_doc["popularity"] = [int(x) for x in popularity]
    (tmp / "items.json").write_text(json.dumps(items_doc))
    index.save(tmp / "index.faiss")
    np.save(tmp / "long_term.npy", np.asarray(long_vectors, np.float32))
    (tmp / "users.json").write_text(json.dumps(long_users))
    manifest = {
        "version": version,
        # Short-term states depend on the LSTM weights only: a nightly refresh that keeps the weights
        # keeps this id, so live users' states survive the swap; a retrain gets a new one.
        "weights_version": meta.pop("weights_version", version),
        "created": time.time(),
        "code_version": code_version(),
        "dim": model.cfg.dim,
        "n_items": model.cfg.n_items,
        "model": model.cfg.to_dict(),
        "files": {name: sha256(tmp / name) for name in FILES},
        **meta,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, final)
    return final


def set_current(root: Path, version: str) -> None:
    tmp = root / f".CURRENT.tmp{os.getpid()}"
    tmp.write_text(version + "\n")
    os.replace(tmp, root / "CURRENT")


def current_version(root: Path) -> str | None:
    p = root / "CURRENT"
    return p.read_text().strip() if p.exists() else None


@dataclass
class Artifact:
    path: Path
    version: str
    manifest: dict
    model: LSTIModel
    online: OnlineModel
    item_ids: list[str]
    index: ItemIndex
    popularity: np.ndarray | None = None  # events per item code; None in artifacts written before it

    @property
    def weights_version(self) -> str:
        return self.manifest.get("weights_version", self.version)

    def long_term(self) -> tuple[list[str], np.ndarray]:
        users = json.loads((self.path / "users.json").read_text())
        return users, np.load(self.path / "long_term.npy")


def verify_artifact(path: Path) -> dict:
    """Return the manifest if every file matches its checksum, else raise BadArtifact."""
    mpath = path / "manifest.json"
    if not mpath.exists():
        raise BadArtifact(f"{path}: no manifest.json")
    manifest = json.loads(mpath.read_text())
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.exists():
            raise BadArtifact(f"{path}: missing {name}")
        if sha256(f) != digest:
            raise BadArtifact(f"{path}: checksum mismatch for {name}")
    return manifest


def stored_config(saved: dict) -> LSTIConfig:
    """The model config an artifact was written with. Artifacts from before the per-user gate have no
    `gate` key and a per-dimension gate: read them as such, not with today's default."""
    return LSTIConfig(**{"gate": "dim", **saved})


def load_artifact(path: Path, index_backend: str = "auto", index_threads: int | None = None) -> Artifact:
    manifest = verify_artifact(path)
    blob = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    cfg = stored_config(blob["config"])
    model = LSTIModel(cfg, blob["state_dict"]["text"])
    model.load_state_dict(blob["state_dict"])
    model.eval()
    index = ItemIndex.load(path / "index.faiss", backend=index_backend, threads=index_threads)
    if index.dim != cfg.dim or manifest.get("dim") != cfg.dim:
        raise BadArtifact(f"{path}: index dimension {index.dim} != model dimension {cfg.dim}")
    items_doc = json.loads((path / "items.json").read_text())
    item_ids = items_doc["item_ids"]
    pop = items_doc.get("popularity")
    popularity = np.asarray(pop, np.int64) if pop is not None else None
    return Artifact(path, manifest["version"], manifest, model, OnlineModel(model), item_ids, index, popularity)
