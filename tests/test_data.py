"""Offline datasets are read exactly as the literature builds its evaluation text, and the
calibration windows are distinct, seeded and bounded by the data."""

from __future__ import annotations

import pytest
import torch

from grail import data
from grail.data import DataError


def test_wikitext_rows_are_the_hub_rows_joined_by_blank_lines(data_dir):
    text = data.load_text("wikitext2", "evaluation", data_dir).text
    raw = (data_dir / "wikitext-2-raw-v1" / "wiki.test.raw").read_text()
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    assert len(rows) == 4358
    assert text == "\n\n".join(rows)
    assert text.startswith("\n\n = Robert Boulter = \n")


def test_ptb_sentences_joined_by_spaces(data_dir):
    text = data.load_text("ptb", "evaluation", data_dir).text
    assert text.startswith("no it was n't black monday but while")
    assert "  " not in text[:1000]


def test_c4_calibration_and_evaluation_documents_do_not_overlap(data_dir):
    evaluation = data.load_text("c4", "evaluation", data_dir).text
    calibration = data.load_text("c4", "calibration", data_dir).text
    assert calibration.split("\n\n")[0] not in evaluation


def test_offline_calibration_uses_the_validation_split(data_dir):
    source = data.load_text("wikitext2", "calibration", data_dir)
    assert "wiki.valid.raw" in source.description


def test_calibration_windows_are_distinct_seeded_and_bounded():
    tokens = torch.arange(1000)
    a = data.calibration_windows(tokens, 8, 100, seed=3)
    b = data.calibration_windows(tokens, 8, 100, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, data.calibration_windows(tokens, 8, 100, seed=4))
    starts = sorted(a[:, 0].tolist())
    assert all(s % 100 == 0 for s in starts) and len(set(starts)) == 8  # whole, non-overlapping windows
    with pytest.raises(DataError, match="enough for 10 windows"):
        data.calibration_windows(tokens, 11, 100, seed=0)


def test_evaluation_windows_cap_and_errors():
    tokens = torch.arange(300 * 10)
    assert data.evaluation_windows(tokens, 10, "c4", None).shape == (256, 10)
    assert data.evaluation_windows(tokens, 10, "wikitext2", 7).shape == (7, 10)
    with pytest.raises(DataError, match="fewer than --seqlen"):
        data.evaluation_windows(torch.arange(5), 10, "ptb", None)


def test_missing_folder_and_missing_files_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist; fix --data_dir"):
        data.resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv("GRAIL_DATA_DIR", str(tmp_path))
    assert data.resolve_data_dir(None) == tmp_path
    with pytest.raises(DataError, match=r"wiki\.test\.raw' is missing"):
        data.load_text("wikitext2", "evaluation", tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        data.load_text("imagenet", "evaluation", tmp_path)
