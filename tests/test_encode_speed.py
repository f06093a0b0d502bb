"""The encoder's speed levers keep their promises: token-budget batches give plain encode's vectors, reduced
precisions stay close to fp32, the cache never mixes precisions, and ``auto`` resolves to a real precision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from miner import precision as prec
from miner.batching import can_slice, slice_features, token_batches
from miner.config import EncodeConfig
from miner.encode import Encoder
from miner.errors import ConfigError

TEXTS = [
    "the cat sat",
    "a dog barked at the postman every single morning of the week, loudly",
    "fish swim",
    "the cat sat",
    "Transcription factors bind promoter regions and recruit RNA polymerase II to start transcription.",
    "x",
]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [None, 1, 7, 40, 10_000])
def test_token_batches_cover_every_row_once_within_the_budget(seed: int, budget: int | None) -> None:
    lengths = np.random.default_rng(seed).integers(1, 30, size=57)
    groups = token_batches(lengths, budget, batch_size=8)
    rows = np.concatenate(groups)
    assert sorted(rows.tolist()) == list(range(57))
    ordered = lengths[rows]
    assert np.all(np.diff(ordered) <= 0)  # longest first
    for group in groups:
        if budget is None:
            assert len(group) <= 8
        elif len(group) > 1:
            assert len(group) * lengths[group].max() <= budget


def test_token_batches_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="1-D"):
        token_batches(np.ones((2, 2)), 10, 4)
    with pytest.raises(ValueError, match="token_budget"):
        token_batches([1, 2], 0, 4)


def test_sliced_features_equal_tokenising_the_rows_alone(model) -> None:
    features = model.preprocess(TEXTS)
    assert can_slice(features, len(TEXTS), model.tokenizer.padding_side)
    rows = np.array([4, 0, 5])
    width = int(features["attention_mask"][rows].sum(1).max())
    alone = model.preprocess([TEXTS[i] for i in rows])
    sliced = slice_features(features, rows, width)
    for name, value in alone.items():
        if hasattr(value, "shape"):
            assert sliced[name].tolist() == value.tolist(), name
        else:
            assert sliced[name] == value


@pytest.mark.parametrize("budget", [8192, 24, None])
def test_fp32_batching_gives_plain_encode_vectors(model, budget: int | None) -> None:
    enc = Encoder(EncodeConfig(precision="fp32", token_budget=budget, batch_size=2), model)
    got = enc.encode(TEXTS, kind="document")
    want = model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    stats = enc.last_stats
    assert stats.precision == "fp32" and stats.encoded == 5 and stats.distinct == 5
    assert stats.padded_tokens >= stats.tokens > 0 and stats.batches >= 1
    if budget == 24:
        assert stats.batches > 1


def test_prompt_goes_through_the_same_path(model) -> None:
    enc = Encoder(EncodeConfig(precision="fp32", query_prompt="query: "), model)
    got = enc.encode(TEXTS[:3], kind="query")
    want = model.encode(TEXTS[:3], prompt="query: ", normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("precision", [p for p in prec.PRECISIONS if p not in ("auto", "fp32")])
def test_reduced_precision_is_close_to_fp32(model, precision: str) -> None:
    fp32 = Encoder(EncodeConfig(precision="fp32"), model).encode(TEXTS, kind="document")
    enc = Encoder(EncodeConfig(precision=precision), model)
    got = enc.encode(TEXTS, kind="document")
    assert enc.precision == precision and enc.last_stats.precision == precision
    assert got.dtype == np.float32 and got.shape == fp32.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert np.sum(got * fp32, axis=1).min() > 0.99


def test_cache_keeps_precisions_apart(model, tmp_path: Path) -> None:
    cache = str(tmp_path)
    fp32 = Encoder(EncodeConfig(precision="fp32", cache_dir=cache), model)
    first = fp32.encode(TEXTS, kind="document")
    bf16 = Encoder(EncodeConfig(precision="bf16", cache_dir=cache), model)
    reduced = bf16.encode(TEXTS, kind="document")
    assert bf16.last_stats.cache_hits == 0 and bf16.last_stats.encoded == 5
    again = Encoder(EncodeConfig(precision="fp32", cache_dir=cache), model)
    np.testing.assert_array_equal(again.encode(TEXTS, kind="document"), first)
    assert again.last_stats.cache_hits == 5 and again.last_stats.encoded == 0
    bf16_again = Encoder(EncodeConfig(precision="bf16", cache_dir=cache), model)
    np.testing.assert_array_equal(bf16_again.encode(TEXTS, kind="document"), reduced)
    assert bf16_again.last_stats.cache_hits == 5
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_dedupe_can_be_switched_off(model) -> None:
    enc = Encoder(EncodeConfig(precision="fp32", dedupe=False), model)
    got = enc.encode(TEXTS, kind="document")
    assert enc.last_stats.encoded == len(TEXTS) and enc.last_stats.distinct == len(TEXTS)
    np.testing.assert_allclose(got[0], got[3], atol=1e-6)


def test_a_text_that_is_query_and_document_is_encoded_once(model, tmp_path: Path) -> None:
    """Equal prompts share one cache namespace: a query equal to a document reuses the document's vector."""
    enc = Encoder(EncodeConfig(precision="fp32", cache_dir=str(tmp_path)), model)
    docs = enc.encode(TEXTS[:3], kind="document")
    queries = enc.encode([TEXTS[1], "a query of its own"], kind="query")
    assert enc.last_stats.cache_hits == 1 and enc.last_stats.encoded == 1
    np.testing.assert_array_equal(queries[0], docs[1])
    prompted = Encoder(EncodeConfig(precision="fp32", cache_dir=str(tmp_path), query_prompt="query: "), model)
    prompted.encode([TEXTS[1]], kind="query")
    assert prompted.last_stats.cache_hits == 0  # another prompt is another text


def test_auto_resolves_to_a_real_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    concrete = set(prec.PRECISIONS) - {"auto"}
    assert prec.resolve_precision("auto", "cpu") in concrete
    assert prec.resolve_precision("auto", "cuda") == "fp32"  # no guard measured off the CPU
    passing = prec.GuardFigures(negative_overlap=0.99, ndcg_delta=0.001, speedup=2.0)
    failing = prec.GuardFigures(negative_overlap=0.80, ndcg_delta=0.001, speedup=3.0)
    monkeypatch.setattr(prec, "AUTO_ORDER", ("bf16",))
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setattr(prec, "GUARD", {"bf16": failing})
    assert prec.resolve_precision("auto", "cpu") == "fp32"  # faster, but it failed the guard
    monkeypatch.setattr(prec, "GUARD", {"bf16": passing})
    assert prec.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset({"avx2"}))
    assert prec.resolve_precision("auto", "cpu") == "fp32"  # bf16 would be emulated
    assert prec.resolve_precision("fp32", "cpu") == "fp32"


def test_guard_table_is_consistent() -> None:
    for name in prec.AUTO_ORDER:
        assert name in prec.PRECISIONS and name not in ("auto", "fp32")
    for name, figures in prec.GUARD.items():
        assert name in prec.PRECISIONS
        assert figures.passed == (figures.negative_overlap >= 0.95 and abs(figures.ndcg_delta) <= 0.005)


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="precision"):
        EncodeConfig(precision="int8")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="token_budget"):
        EncodeConfig(token_budget=0)


def test_cli_flags_reach_the_manifest(small_beir: Path, tmp_path: Path) -> None:
    from miner.cli import main
    from miner.write import manifest_path

    out = tmp_path / "t.jsonl"
    assert main(["mine", "--data", str(small_beir), "--out", str(out), "--no-cache", "--quiet",
                 "--precision", "fp32", "--token-budget", "none", "--batch-size", "16"]) == 0
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["config"]["encode"]["precision"] == "fp32"
    assert manifest["config"]["encode"]["token_budget"] is None
    docs = manifest["encoding"]["documents"]
    assert docs["precision"] == "fp32" and docs["batching"] == "fixed 16" and docs["batches"] >= 1
