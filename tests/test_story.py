"""examples/scifact_story.py end to end on a small cut of SciFact: mine -> train -> eval set -> evaluate."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "scifact_story.py"


@pytest.fixture(scope="module")
def story() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scifact_story", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    yield module
    sys.modules.pop(spec.name, None)


def test_cut_keeps_judged_documents(story: ModuleType, scifact: Path, tmp_path: Path) -> None:
    from miner import load_beir

    cut = story.cut_beir(scifact, tmp_path / "cut", max_train_queries=10, max_test_queries=12, max_docs=80, seed=0)
    for split, n in (("train", 10), ("test", 12)):
        ds = load_beir(cut, split)
        assert len(ds.queries) == n
    assert len((cut / "corpus.jsonl").read_text().splitlines()) == 80


@pytest.mark.slow
def test_story_on_a_small_cut(story: ModuleType, scifact: Path, model, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    cache = os.environ.get("MINER_TEST_CACHE_DIR") or str(tmp_path / "cache")
    argv = ["--data", str(scifact), "--out", str(tmp_path / "story"), "--max-train-queries", "48",
            "--max-test-queries", "60", "--max-docs", "300", "--budget", "30", "--steps", "3", "--batch-size", "8",
            "--max-seq-length", "128", "--distractors", "10", "--background", "30", "--bootstrap", "200",
            "--cache-dir", cache]
    assert story.main(argv) == 0
    printed = capsys.readouterr().out
    for step in ("1. mined", "2. eval set", "3. trained", "4. base model", "nDCG@10: base -> fine-tuned"):
        assert step in printed
    report = json.loads((tmp_path / "story" / "story.json").read_text())
    evalset = report["evalset"]
    assert evalset["selected_queries"] == 30 and evalset["population"]["queries"] == 60
    assert evalset["weights_sum"] == pytest.approx(60)
    assert evalset["leakage"]["training_set"].endswith("train.tsv")
    assert len(report["losses"]) == 3
    for name in ("base", "tuned"):
        result = report[name]
        assert result["queries"] == 30 and result["population_size"] == pytest.approx(60)
        est = result["population"]["nDCG@10"]
        assert est["low"] <= est["value"] <= est["high"]
        assert {s["stratum"] for s in result["strata"]} == {s["stratum"] for s in evalset["strata"]}
    # training changed the model: the fine-tuned evaluation encodes with other weights
    assert report["base"]["model"]["fingerprint"] != report["tuned"]["model"]["fingerprint"]
