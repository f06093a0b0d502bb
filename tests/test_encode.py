"""The encoder and its on-disk cache: keyed by weights, prompt and text; each distinct text encoded once."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from miner.config import EncodeConfig
from miner.encode import EmbeddingCache, Encoder, model_fingerprint, resolve_model
from miner.errors import ModelError

TEXTS = ["the cat sat", "a dog barked", "the cat sat", "fish swim"]


def test_cache_hits_and_identical_vectors(model, tmp_path: Path) -> None:
    enc = Encoder(EncodeConfig(cache_dir=str(tmp_path)), model)
    first = enc.encode(TEXTS, kind="document")
    assert enc.last_stats.encoded == 3 and enc.last_stats.distinct == 3  # the repeated text once
    np.testing.assert_array_equal(first[0], first[2])
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    again = Encoder(EncodeConfig(cache_dir=str(tmp_path)), model)
    second = again.encode(TEXTS + ["new text"], kind="document")
    assert again.last_stats.cache_hits == 3 and again.last_stats.encoded == 1
    np.testing.assert_array_equal(second[:4], first)
    direct = model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(first, direct, atol=1e-5)


def test_prompt_and_weights_change_the_key(model, tmp_path: Path) -> None:
    base = Encoder(EncodeConfig(cache_dir=str(tmp_path)), model)
    base.encode(TEXTS, kind="query")
    prompted = Encoder(EncodeConfig(cache_dir=str(tmp_path), query_prompt="query: "), model)
    prompted.encode(TEXTS, kind="query")
    assert prompted.last_stats.cache_hits == 0
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        next(tuned.parameters()).mul_(1.001)
    assert model_fingerprint(tuned) != model_fingerprint(model)
    stale = Encoder(EncodeConfig(cache_dir=str(tmp_path)), tuned)
    stale.encode(TEXTS, kind="query")
    assert stale.last_stats.cache_hits == 0


def test_interrupted_shard_is_ignored(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path, "ns")
    keys = np.array([b"a" * 16, b"b" * 16], dtype="V16")
    cache.add(keys, np.ones((2, 3), dtype=np.float32))
    # A shard whose keys file never landed (killed mid-write) does not count.
    np.save(tmp_path / "ns" / "zzz.emb.npy", np.zeros((1, 3), dtype=np.float32))
    found, emb = EmbeddingCache(tmp_path, "ns").lookup(np.array([b"a" * 16, b"c" * 16], dtype="V16"))
    assert found.tolist() == [True, False] and emb is not None and emb[0].tolist() == [1, 1, 1]


def test_model_resolution_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"))
    assert resolve_model("some-org/some-model") == "some-org/some-model"


def test_mnrl_step_trains_and_matches_the_loss(model) -> None:
    """One step: the loss it returns is MultipleNegativesRankingLoss on those columns, and the weights move."""
    import copy

    import torch

    from miner.encode import model_fingerprint
    from miner.training import features, mnrl_loss, mnrl_step

    trained = copy.deepcopy(model)
    columns = [["what do cats eat", "why is the sky blue"], ["Cats eat mice.", "Rayleigh scattering."],
               ["Dogs bark.", "The sea is wet."]]
    loss_fn = mnrl_loss(trained)
    trained.train()
    torch.manual_seed(0)  # the same dropout masks for both computations
    with torch.no_grad():
        expected = float(loss_fn([features(trained, c) for c in columns], None))
    before = model_fingerprint(trained)
    optimizer = torch.optim.SGD(trained.parameters(), lr=1e-3)
    torch.manual_seed(0)
    got = mnrl_step(trained, loss_fn, optimizer, columns)
    assert got == pytest.approx(expected, rel=1e-5)
    assert model_fingerprint(trained) != before
    with pytest.raises(ValueError, match="one length"):
        mnrl_step(trained, loss_fn, optimizer, [["a"], ["b", "c"]])


@pytest.mark.parametrize("ask_missing", [False, True])
def test_lookup_gathers_rows_across_shards_in_any_order(tmp_path: Path, ask_missing: bool) -> None:
    """Keys spread over three shards, asked in a shuffled order (with and without unknown keys), come back
    with their own vectors: checked against a plain dict of what was added."""
    rng = np.random.default_rng(0)
    cache = EmbeddingCache(tmp_path, "ns")
    added: dict[bytes, np.ndarray] = {}
    for shard in range(3):
        keys = np.array([bytes([shard, i]) * 8 for i in range(5)], dtype="V16")
        vectors = rng.standard_normal((5, 4)).astype(np.float32)
        cache.add(keys, vectors)
        added.update(zip(keys.tolist(), vectors))
    asked = list(added)
    rng.shuffle(asked)
    if ask_missing:
        asked.insert(3, b"z" * 16)
    found, emb = EmbeddingCache(tmp_path, "ns").lookup(np.array(asked, dtype="V16"))
    assert found.tolist() == [k in added for k in asked]
    assert emb is not None
    for i, key in enumerate(asked):
        np.testing.assert_array_equal(emb[i], added[key] if key in added else np.zeros(4, dtype=np.float32))
