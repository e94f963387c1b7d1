"""Calibration windows and evaluation token streams for WikiText-2, PTB and C4.

Text is read from the Hugging Face Hub with ``datasets`` or, offline, from a local folder
laid out like the project's ``shared/data`` (``--data_dir`` or ``GRAIL_DATA_DIR``). The
evaluation text is built exactly as the pruning literature builds it:

* WikiText-2 raw test: rows joined with ``"\\n\\n"``;
* PTB test: sentences joined with ``" "``;
* C4: the first 1100 documents of the validation shard joined with ``" "``, at most 256 windows.

Offline there is no train split. Calibration then uses the validation split of WikiText-2
and PTB, and for C4 the documents after the first 1100 of the local file, so calibration
and evaluation text never overlap.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from grail.config import DATA_DIR_ENV, DATASETS
from grail.errors import GrailError

log = logging.getLogger(__name__)

C4_EVAL_DOCS = 1100
C4_EVAL_WINDOWS = 256

_OFFLINE_FILES = {
    ("wikitext2", "calibration"): "wikitext-2-raw-v1/wiki.valid.raw",
    ("wikitext2", "evaluation"): "wikitext-2-raw-v1/wiki.test.raw",
    ("ptb", "calibration"): "ptb/ptb.valid.txt",
    ("ptb", "evaluation"): "ptb/ptb.test.txt",
    ("c4", "calibration"): "c4/c4_validation_2k.jsonl",
    ("c4", "evaluation"): "c4/c4_validation_2k.jsonl",
}


class DataError(GrailError, ValueError):
    """Calibration or evaluation data is missing or too small."""


@dataclass(frozen=True)
class TextSource:
    text: str
    description: str  # where the text came from, for logs and results


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The offline data folder: the argument, else ``$GRAIL_DATA_DIR``, else None (use the hub)."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise DataError(f"data folder {str(path)!r} does not exist; fix --data_dir or ${DATA_DIR_ENV}.")
    return path


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")


def _wikitext_rows(raw: str) -> list[str]:
    """Lines of a raw WikiText file as the Hub's rows: whitespace-only lines become ''."""
    return [line if line.strip() else "" for line in raw.splitlines(keepends=True)]


def _read_offline(name: str, purpose: str, root: Path) -> TextSource:
    path = root / _OFFLINE_FILES[(name, purpose)]
    if not path.is_file():
        raise DataError(
            f"{name} {purpose} file {str(path)!r} is missing from the data folder; point --data_dir "
            f"(or ${DATA_DIR_ENV}) at a folder laid out like shared/data, or unset it to use the Hub."
        )
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); restore the file."
        ) from None
    if not raw.strip():
        raise DataError(f"{str(path)!r} is empty; replace it with the real file.")
    if name == "wikitext2":
        text = "\n\n".join(_wikitext_rows(raw))
    elif name == "ptb":
        text = " ".join(line.strip() for line in raw.splitlines())
    else:
        docs = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(
                    f"{str(path)!r} line {number} is not a JSON object with a 'text' field "
                    f"({err.__class__.__name__}); restore the file."
                ) from None
        if purpose == "evaluation":
            text = " ".join(docs[:C4_EVAL_DOCS])
        else:
            if len(docs) <= C4_EVAL_DOCS:
                raise DataError(f"{str(path)!r} has no documents beyond the {C4_EVAL_DOCS} used for evaluation.")
            text = "\n\n".join(docs[C4_EVAL_DOCS:])
    split = path.name if name != "c4" else f"{path.name} docs " + ("0-1099" if purpose == "evaluation" else "1100-")
    return TextSource(text, f"offline {name} {split}")


def _read_hub(name: str, purpose: str, seed: int) -> TextSource:
    try:
        from datasets import load_dataset

        if name == "wikitext2":
            split = "train" if purpose == "calibration" else "test"
            rows = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)["text"]
            return TextSource("\n\n".join(rows), f"hub wikitext-2-raw-v1 {split}")
        if name == "ptb":
            split = "train" if purpose == "calibration" else "test"
            rows = load_dataset("ptb-text-only/ptb_text_only", "penn_treebank", split=split)["sentence"]
            return TextSource(" ".join(rows), f"hub ptb_text_only {split}")
        if purpose == "evaluation":
            files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
            docs = load_dataset("allenai/c4", data_files=files, split="validation")["text"]
            return TextSource(" ".join(docs[:C4_EVAL_DOCS]), "hub c4 validation shard 0, first 1100 docs")
        files = {"train": "en/c4-train.00000-of-01024.json.gz"}
        docs = load_dataset("allenai/c4", data_files=files, split="train").shuffle(seed=seed)
        # Enough documents for any calibration set; windows are drawn from their concatenation.
        return TextSource("\n\n".join(docs.select(range(20000))["text"]), "hub c4 train shard 0, 20000 random docs")
    except Exception as err:  # the datasets library raises many kinds of network errors
        raise DataError(
            f"could not fetch {name} ({purpose}) from the Hugging Face Hub: {err.__class__.__name__}: {err}. "
            f"Without network access, pass --data_dir (or set ${DATA_DIR_ENV}) to a local copy."
        ) from None


def load_text(name: str, purpose: str, data_dir: Path | None, seed: int = 0) -> TextSource:
    """The calibration (``purpose="calibration"``) or evaluation text of a dataset."""
    _check_name(name)
    if purpose not in ("calibration", "evaluation"):
        raise ValueError(f"purpose must be 'calibration' or 'evaluation', got {purpose!r}")
    if data_dir is not None:
        return _read_offline(name, purpose, data_dir)
    return _read_hub(name, purpose, seed)


def tokenize(tokenizer, text: str) -> Tensor:
    """One long token stream (1-D LongTensor)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids
    return ids[0]


def calibration_windows(tokens: Tensor, nsamples: int, seqlen: int, seed: int) -> Tensor:
    """``nsamples`` distinct, non-overlapping windows of ``seqlen`` tokens, chosen at random.

    The stream is cut into consecutive windows and a seeded random subset is taken, so the
    samples never share tokens (which keeps held-out folds honest).
    """
    available = len(tokens) // seqlen
    if nsamples > available:
        raise DataError(
            f"the calibration text has {len(tokens)} tokens, enough for {available} windows of "
            f"{seqlen} tokens, but {nsamples} were requested; lower --nsamples or --seqlen."
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:nsamples]
    return tokens[: available * seqlen].view(available, seqlen)[chosen]


def evaluation_windows(tokens: Tensor, seqlen: int, name: str, max_windows: int | None) -> Tensor:
    """Consecutive non-overlapping windows of ``seqlen`` tokens (C4: at most 256)."""
    available = len(tokens) // seqlen
    if name == "c4":
        available = min(available, C4_EVAL_WINDOWS)
    if available == 0:
        raise DataError(f"the {name} evaluation text has {len(tokens)} tokens, fewer than --seqlen {seqlen}.")
    n = available if max_windows is None else min(max_windows, available)
    return tokens[: n * seqlen].view(n, seqlen)
