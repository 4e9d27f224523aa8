"""FAISS item index: build, save, load, search (faiss-cpu, faiss-gpu or torch-CUDA)."""

from index.item_index import ItemIndex, available_backends

__all__ = ["ItemIndex", "available_backends"]
