"""The ``miner`` command through ``main([...])``: a run, ``stats``, and bad input as a new user tries it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miner.cli import main
from miner.write import manifest_path, parts_dir, read_rows

pytestmark = pytest.mark.usefixtures("model")


def _mine(data: Path, out: Path, cache: Path, *extra: str) -> int:
    return main(["mine", "--data", str(data), "--out", str(out), "--cache-dir", str(cache), "--quiet",
                 "--num-negatives", "2", *extra])


def test_mine_then_stats(small_beir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out" / "pairs.jsonl"
    assert _mine(small_beir, out, tmp_path / "c", "--format", "labeled-pair", "--sampling", "spread",
                 "--range", "2:30") == 0
    rows = read_rows(out)
    assert {r["label"] for r in rows} == {0, 1}
    assert all(2 <= r["rank"] < 30 for r in rows if r["label"] == 0)
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["command"][:2] == ["miner", "mine"]
    assert manifest["config"]["select"]["range_min"] == 2
    capsys.readouterr()
    assert main(["stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows"] == len(rows) and stats["queries"] == manifest["counts"]["queries"]
    assert stats["complete"].startswith("yes")
    assert main(["stats", str(out)]) == 0
    assert "negative scores" in capsys.readouterr().out


def test_summary_table_unless_quiet(small_beir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "t.parquet"
    code = main(["mine", "--data", str(small_beir), "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--num-negatives", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "skipped: positive" in printed and "time: encode_documents" in printed


def _expect_error(capsys, argv: list[str], needle: str, out: Path) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("miner: error: "), err
    assert needle in err[0], err[0]
    assert not out.exists() and not manifest_path(out).exists()


def test_bad_input_gives_one_line_and_no_output(small_beir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o" / "x.parquet"
    base = ["mine", "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--quiet"]

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    _expect_error(capsys, [*base, "--data", str(pairs)], "columns are: question, answer", out)

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"query": "a", "positive": "b"}) + "\n{\"query\": \n")
    _expect_error(capsys, [*base, "--data", str(broken)], "broken.jsonl:2: invalid JSON", out)

    _expect_error(capsys, [*base, "--data", str(small_beir), "--split", "dev"], "dev.tsv not found", out)

    empty = tmp_path / "empty_beir"
    empty.mkdir()
    for name in ("corpus.jsonl", "queries.jsonl"):
        (empty / name).write_text((small_beir / name).read_text() if name == "queries.jsonl" else "")
    (empty / "qrels").mkdir()
    (empty / "qrels" / "train.tsv").write_text((small_beir / "qrels" / "train.tsv").read_text())
    _expect_error(capsys, [*base, "--data", str(empty)], "holds no documents", out)

    _expect_error(capsys, [*base, "--data", str(small_beir), "--model", str(tmp_path / "no-model")],
                  "does not exist", out)
    _expect_error(capsys, [*base, "--data", str(small_beir), "--range", "5:2"], "0 <= MIN < MAX", out)
    _expect_error(capsys, [*base, "--data", str(tmp_path / "missing")], "not found", out)


def test_bad_out_suffix(small_beir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.csv"
    _expect_error(capsys, ["mine", "--data", str(small_beir), "--out", str(out), "--quiet"],
                  "must end in .parquet or .jsonl", out)


def test_interrupt_exit_code_and_resume_message(small_beir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from miner.write import PartWriter

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PartWriter, "write_part", interrupt)
    out = tmp_path / "i.parquet"
    assert _mine(small_beir, out, tmp_path / "c") == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert not out.exists() and parts_dir(out).is_dir()
    _expect_error(capsys, ["stats", str(out)], "did not finish", out)


def test_index_and_nprobe_reach_the_search(small_beir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ivf.parquet"
    assert _mine(small_beir, out, tmp_path / "c", "--index", "ivf", "--nprobe", "3") == 0
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["config"]["search"]["nprobe"] == 3
    assert manifest["search"]["index"].startswith("IVF")
    assert manifest["counts"]["negatives"] > 0
