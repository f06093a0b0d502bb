"""End to end with the real default model on a small BEIR cut: formats, determinism, resume, cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from miner.config import EncodeConfig, MineConfig, OutputConfig, SearchConfig, SelectConfig
from miner.data import load_beir, normalize_text
from miner.encode import Encoder
from miner.pipeline import Miner, mine
from miner.write import PartWriter, manifest_path, meta_path, parts_dir, read_rows

pytestmark = pytest.mark.usefixtures("model")


def _config(tmp_path: Path, **output) -> MineConfig:
    return MineConfig(
        encode=EncodeConfig(cache_dir=str(tmp_path / "cache")),
        search=SearchConfig(query_batch_size=5),
        select=SelectConfig(num_negatives=3),
        output=OutputConfig(**output),
    )


def _rows(path: Path) -> list[dict]:
    return read_rows(path)


def test_in_memory_negatives_respect_the_rules(small_beir: Path, model, tmp_path: Path) -> None:
    ds = load_beir(small_beir)
    result = mine(ds, None, _config(tmp_path), model=model)
    neg = result.negatives
    assert neg is not None and neg.ids.shape == (len(ds.queries), 3)
    for r in range(len(ds.queries)):
        positives = set(ds.qrels.positives(r).tolist())
        pos_texts = {normalize_text(ds.corpus.texts[p]) for p in positives}
        chosen = [d for d in neg.ids[r].tolist() if d >= 0]
        assert not positives & set(chosen)
        assert all(normalize_text(ds.corpus.texts[d]) not in pos_texts for d in chosen)
        assert all(ds.corpus.ids[d] != ds.queries.ids[r] for d in chosen)
        assert (neg.scores[r][: len(chosen)] <= neg.ceiling[r] + 1e-6).all()
        assert list(neg.ranks[r][: len(chosen)]) == sorted(neg.ranks[r][: len(chosen)])
    # Every positive scores at least s > ceiling >= any pooled candidate, so each one is counted as skipped.
    assert result.stats.skipped["positive"] == sum(len(ds.qrels.positives(r)) for r in range(len(ds.queries)))


@pytest.mark.parametrize("fmt", ["triplet", "n-tuple", "labeled-pair", "labeled-list"])
def test_formats_and_manifest(small_beir: Path, model, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"{fmt}.jsonl"
    result = mine(small_beir, out, _config(tmp_path, format=fmt, file_format="jsonl"), model=model)
    rows = _rows(out)
    ds = result.dataset
    in_memory = mine(ds, None, _config(tmp_path, format=fmt, file_format="jsonl"), model=model).negatives
    n_neg = {ds.queries.ids[r]: int(c) for r, c in enumerate(in_memory.counts())}
    n_pos = {ds.queries.ids[r]: len(ds.qrels.positives(r)) for r in range(len(ds.queries))}
    assert result.stats.negatives == sum(n_neg.values())
    if fmt == "triplet":
        assert len(rows) == sum(n_pos[q] * n_neg[q] for q in n_pos)
        assert {"query_id", "query", "positive_id", "positive", "negative_id", "negative", "negative_score",
                "negative_rank", "positive_score"} == set(rows[0])
    elif fmt == "n-tuple":
        assert {"negative_1", "negative_3_id", "negative_2_score"} <= set(rows[0])
        assert len(rows) == sum(n_pos[q] for q in n_pos if n_neg[q] == 3)
    elif fmt == "labeled-pair":
        assert len(rows) == sum(n_pos.values()) + sum(n_neg.values())
        assert sum(r["label"] for r in rows) == sum(n_pos.values())
    else:
        assert len(rows) == len(ds.queries)
        assert sum(len(r["document_ids"]) for r in rows) == sum(n_pos.values()) + sum(n_neg.values())
    manifest = json.loads(manifest_path(out).read_text())
    for key in ("miner_version", "config", "model", "inputs", "counts", "skipped", "scores", "timings", "encoding"):
        assert key in manifest, key
    assert manifest["output"]["rows"] == len(rows)
    assert manifest["model"]["fingerprint"] and len(manifest["inputs"]["sources"]) == 3
    assert manifest["scores"]["negative"]["count"] == sum(n_neg.values())
    assert not parts_dir(out).exists()


def test_same_inputs_same_rows_and_warm_cache(small_beir: Path, model, tmp_path: Path) -> None:
    config = _config(tmp_path).replace(select={"sampling": "random", "range_max": 20})
    a = mine(small_beir, tmp_path / "a.parquet", config, model=model)
    b = mine(small_beir, tmp_path / "b.parquet", config, model=model)
    assert _rows(tmp_path / "a.parquet") == _rows(tmp_path / "b.parquet")
    assert a.manifest["encoding"]["documents"]["encoded"] > 0
    assert b.manifest["encoding"]["documents"]["encoded"] == 0
    assert b.manifest["encoding"]["queries"]["encoded"] == 0
    c = mine(small_beir, tmp_path / "c.parquet", config.replace(select={"seed": 1}), model=model)
    assert _rows(tmp_path / "c.parquet") != _rows(tmp_path / "a.parquet")
    assert c.stats.negatives == a.stats.negatives


def test_interrupted_run_resumes_to_the_same_rows(small_beir: Path, model, tmp_path: Path, monkeypatch) -> None:
    config = _config(tmp_path)
    full = tmp_path / "full.parquet"
    mine(small_beir, full, config, model=model)

    out = tmp_path / "resumed.parquet"
    real_write = PartWriter.write_part
    calls = {"n": 0}

    def crash_on_third(self, index, cols, stats):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_write(self, index, cols, stats)

    monkeypatch.setattr(PartWriter, "write_part", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        mine(small_beir, out, config, model=model)
    # Nothing that looks complete: no output file, no manifest, the parts folder says "unfinished".
    assert not out.exists() and not manifest_path(out).exists()
    assert len(list(parts_dir(out).glob("part-*.parquet"))) == 2
    monkeypatch.setattr(PartWriter, "write_part", real_write)
    result = mine(small_beir, out, config, model=model)
    assert result.manifest["resumed_parts"] == 2
    assert _rows(out) == _rows(full)
    full_manifest = json.loads(manifest_path(full).read_text())
    assert result.manifest["counts"] == full_manifest["counts"]
    assert result.manifest["skipped"] == full_manifest["skipped"]
    assert result.manifest["scores"] == full_manifest["scores"]


def _interrupt_after_first_part(data: Path, out: Path, config: MineConfig, model, monkeypatch) -> None:
    """Run ``mine`` until it writes part 1, where a KeyboardInterrupt stops it (part 0 stays on disk)."""
    real_write = PartWriter.write_part

    def crash(self, index, cols, stats):
        if index == 1:
            raise KeyboardInterrupt
        real_write(self, index, cols, stats)

    with monkeypatch.context() as patched:
        patched.setattr(PartWriter, "write_part", crash)
        with pytest.raises(KeyboardInterrupt):
            mine(data, out, config, model=model)
    assert len(list(parts_dir(out).glob("part-*.parquet"))) == 1


def test_changed_settings_do_not_resume_stale_parts(small_beir: Path, model, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "x.parquet"
    _interrupt_after_first_part(small_beir, out, _config(tmp_path), model, monkeypatch)
    result = mine(small_beir, out, _config(tmp_path).replace(select={"num_negatives": 2}), model=model)
    assert result.manifest["resumed_parts"] == 0
    assert result.stats.negatives <= 2 * len(result.dataset.queries)


@pytest.mark.parametrize("edit", ["corpus.jsonl", "split"])
def test_changed_inputs_do_not_resume_stale_parts(small_beir: Path, model, tmp_path: Path, monkeypatch, edit: str) -> None:
    """The run key of a folder run is its files' sha256 and the loader options: an edited document or another
    split starts afresh (that the same files resume is test_interrupted_run_resumes_to_the_same_rows)."""
    data = tmp_path / "beir"
    shutil.copytree(small_beir, data)
    out = tmp_path / "x.parquet"
    _interrupt_after_first_part(data, out, _config(tmp_path), model, monkeypatch)
    split = "train"
    if edit == "corpus.jsonl":
        lines = (data / "corpus.jsonl").read_text().splitlines()
        record = json.loads(lines[0])
        record["text"] += " (edited)"
        (data / "corpus.jsonl").write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    else:
        shutil.copy(data / "qrels" / "train.tsv", data / "qrels" / "other.tsv")
        split = "other"
    result = mine(data, out, _config(tmp_path), model=model, split=split)
    assert result.manifest["resumed_parts"] == 0


def test_sentence_transformers_columns_and_no_texts(small_beir: Path, model, tmp_path: Path) -> None:
    out = tmp_path / "st.parquet"
    mine(small_beir, out, _config(tmp_path, format="n-tuple", column_names="sentence-transformers"), model=model)
    rows, meta = _rows(out), _rows(meta_path(out))
    assert list(rows[0]) == ["anchor", "positive", "negative_1", "negative_2", "negative_3"]
    assert len(meta) == len(rows) and "negative_1_id" in meta[0] and "query_id" in meta[0]
    out2 = tmp_path / "ids.parquet"
    mine(small_beir, out2, _config(tmp_path, texts=False), model=model)
    row = _rows(out2)[0]
    assert "negative" not in row and "query" not in row and row["negative_id"] and "negative_score" in row


def test_miner_object_mines_and_refreshes(small_beir: Path, model, tmp_path: Path) -> None:
    ds = load_beir(small_beir)
    config = _config(tmp_path)
    miner = Miner(ds.corpus, model, config)
    batch = miner.mine(ds.queries.texts[:4], [[ds.corpus.ids[p] for p in ds.qrels.positives(r)] for r in range(4)],
                       query_ids=ds.queries.ids[:4])
    assert len(batch.doc_texts) == 4 and all(len(t) == 3 for t in batch.doc_texts)
    # The same negatives as the whole-dataset run.
    full = mine(ds, None, config, model=model)
    np.testing.assert_array_equal(batch.negatives.ids, full.negatives.ids[:4])
    before = miner.encoder.fingerprint
    import copy

    import torch

    tuned = copy.deepcopy(model)
    with torch.no_grad():
        next(tuned.parameters()).add_(0.01)
    miner.refresh(tuned)
    assert miner.encoder.fingerprint != before
    assert miner.doc_stats.encoded == len(set(ds.corpus.texts))  # nothing reused from the old model's cache
    with pytest.raises(ValueError, match="not in the corpus"):
        miner.mine(["q"], [["no-such-doc"]])


def test_resume_key_holds_the_precision_that_ran(small_beir: Path, model, tmp_path: Path) -> None:
    """``auto`` resolves per machine: a run resumes parts made with the precision it resolved to, not others."""
    keys = {}
    for precision in ("auto", "fp32", "bf16"):
        result = mine(small_beir, None, _config(tmp_path).replace(encode={"precision": precision}), model=model)
        keys[precision] = result.manifest["run_key"]
    resolved = Encoder(EncodeConfig(precision="auto"), model).precision
    assert keys["auto"] == keys[resolved]
    assert keys["fp32"] != keys["bf16"]
