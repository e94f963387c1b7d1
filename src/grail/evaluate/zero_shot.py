"""Zero-shot accuracy with lm-evaluation-harness, from the Hub or from local files.

The six tasks of the pruning literature (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-Easy,
ARC-Challenge) are scored 0-shot by the harness's own log-likelihood multiple choice:
``acc`` and, where the task defines it, the length-normalised ``acc_norm``.

Offline (``data_dir``), each task's local file (the layout of the project's ``shared/data``)
is converted to the Hub dataset's rows, and a task config is generated that *includes* the
harness's built-in task config and only points it at the local file. Prompts,
preprocessing and metrics are therefore the harness's own.

The local HellaSwag copy is a derived text format that keeps only ``ctx = ctx_a + " " + ctx_b``.
The harness builds its query from ``ctx_a + " " + ctx_b.capitalize()``, so the split is
recovered where it shows: a context ending in a lower-case fragment after its last sentence
(the ActivityNet rows) has that fragment as ``ctx_b``. Contexts that end in a full sentence
(the WikiHow rows, whose ``ctx_b`` is empty on the Hub) are ``ctx_a`` alone. A few rows
whose final fragment follows no sentence end keep an empty ``ctx_b`` and stay uncapitalised.
"""

from __future__ import annotations

import bz2
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from unittest import mock

from torch import nn

from grail.errors import GrailError

TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")

# task -> (built-in config inside lm_eval/tasks, split the harness evaluates)
_BUILTIN = {
    "boolq": ("super_glue/boolq/default.yaml", "validation"),
    "piqa": ("piqa/piqa.yaml", "validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "winogrande": ("winogrande/default.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test"),
}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _labels(path: Path) -> list[str]:
    return path.read_text().split()


def _boolq(root: Path) -> list[dict]:
    # Hub (super_glue/boolq): passage = title + " -- " + passage, label 1 means True.
    rows = _jsonl(root / "boolq" / "dev.jsonl")
    return [
        {"question": r["question"], "passage": f"{r['title']} -- {r['passage']}", "idx": i, "label": int(r["answer"])}
        for i, r in enumerate(rows)
    ]


def _piqa(root: Path) -> list[dict]:
    return [
        {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
        for r, y in _labelled(root / "piqa", "valid", "piqa")
    ]


def _winogrande(root: Path) -> list[dict]:
    return [
        {"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": str(y)}
        for r, y in _labelled(root / "winogrande", "dev", "winogrande")
    ]


def _arc(name: str) -> Callable[[Path], list[dict]]:
    def convert(root: Path) -> list[dict]:
        # Answer keys stay as given (letters, or digits for some rows), like the Hub's.
        rows = _jsonl(root / "arc" / f"ARC-{name}-Test.jsonl")
        return [
            {
                "id": r["id"],
                "question": r["question"]["stem"],
                "choices": {
                    "text": [c["text"] for c in r["question"]["choices"]],
                    "label": [c["label"] for c in r["question"]["choices"]],
                },
                "answerKey": r["answerKey"],
            }
            for r in rows
        ]

    return convert


# A lower-case fragment after the last sentence end: HellaSwag's ctx_b (ActivityNet rows).
_CTX_B = re.compile(r"^(?P<a>.*[.!?])\s+(?P<b>[a-z][^.!?]*)$")


def split_hellaswag_context(context: str) -> tuple[str, str]:
    """``(ctx_a, ctx_b)`` of a HellaSwag context joined as ``ctx_a + " " + ctx_b``."""
    match = _CTX_B.match(context)
    return (match["a"], match["b"]) if match else (context, "")


def _hellaswag(root: Path) -> list[dict]:
    # Six lines per task: "activity_label: context", the gold label, four endings.
    with bz2.open(root / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise GrailError(
            "the local HellaSwag file is not a whole number of 6-line tasks; replace it with the real file."
        )
    rows = []
    for i in range(0, len(lines), 6):
        activity, _, context = lines[i].partition(": ")
        ctx_a, ctx_b = split_hellaswag_context(context)
        rows.append(
            {
                "ind": i // 6,
                "activity_label": activity,
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": context,
                "endings": lines[i + 2 : i + 6],
                "label": lines[i + 1].strip(),
            }
        )
    return rows


def _labelled(folder: Path, split: str, task: str) -> list[tuple[dict, str]]:
    """Rows of ``<split>.jsonl`` paired with the lines of ``<split>-labels.lst`` (the AI2 layout)."""
    rows, labels = _jsonl(folder / f"{split}.jsonl"), _labels(folder / f"{split}-labels.lst")
    if len(rows) != len(labels):
        raise GrailError(f"the local {task} rows ({len(rows)}) and labels ({len(labels)}) differ in number.")
    return list(zip(rows, labels, strict=True))


CONVERTERS: dict[str, Callable[[Path], list[dict]]] = {
    "boolq": _boolq,
    "piqa": _piqa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "arc_easy": _arc("Easy"),
    "arc_challenge": _arc("Challenge"),
}


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise GrailError(
            "zero-shot evaluation needs lm-evaluation-harness: pip install 'grail[eval]' (or pip install lm-eval)."
        ) from None
    return lm_eval


def task_config(task: str, name: str, data_file: Path, builtin_root: Path) -> str:
    """A harness task config named ``name``: the built-in config of ``task``, reading ``data_file``."""
    builtin, split = _BUILTIN[task]
    # json.dumps quotes paths and names as valid YAML scalars.
    config = [
        f"include: {json.dumps(str(builtin_root / builtin))}",
        f"task: {name}",
        "tag: []",
        "dataset_path: json",
        "dataset_name: null",
        "dataset_kwargs:",
        "  keep_in_memory: true",
        "  data_files:",
        f"    {split}: {json.dumps(str(data_file))}",
        "training_split: null",
        f"validation_split: {'validation' if split == 'validation' else 'null'}",
        f"test_split: {'test' if split == 'test' else 'null'}",
    ]
    return "\n".join(config) + "\n"


def _converted(task: str, data_dir: Path) -> list[dict]:
    """The local file of ``task`` as Hub rows, or a one-line error naming the file."""
    try:
        return CONVERTERS[task](data_dir)
    except FileNotFoundError as err:
        raise GrailError(
            f"zero-shot task {task}: {err.filename} is missing; point --data_dir at a folder laid out like shared/data."
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, ValueError) as err:
        raise GrailError(
            f"zero-shot task {task}: a local file under {str(data_dir)!r} is damaged ({err.__class__.__name__}: "
            f"{err}); restore it from shared/data."
        ) from None


def check_local_tasks(data_dir: Path, tasks: tuple[str, ...] = TASKS) -> None:
    """Fail before any work unless every task's local files are present and readable."""
    for task in tasks:
        _converted(task, data_dir)


def write_local_tasks(data_dir: Path, out_dir: Path, tasks: tuple[str, ...] = TASKS) -> dict[str, str]:
    """Convert the local files and write one task config per task; returns task -> harness task name."""
    lm_eval = require_lm_eval()
    builtin_root = Path(lm_eval.__file__).parent / "tasks"
    names = {}
    for task in tasks:
        rows = _converted(task, data_dir)
        data_file = out_dir / f"{task}.jsonl"
        data_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        name = f"grail_{task}"
        (out_dir / f"{name}.yaml").write_text(task_config(task, name, data_file, builtin_root))
        names[task] = name
    return names


def zero_shot(
    model: nn.Module,
    tokenizer,
    tasks: tuple[str, ...] = TASKS,
    batch_size: int = 16,
    limit: int | None = None,
    data_dir: Path | None = None,
) -> dict:
    """0-shot ``acc`` / ``acc_norm`` per task and their means, as ``{"tasks": {...}, "mean_acc", ...}``.

    ``limit`` keeps the first N examples of each task. ``mean_acc`` averages ``acc`` over the
    tasks; ``mean_acc_norm`` averages ``acc_norm`` where a task defines it and ``acc`` where not
    (BoolQ, WinoGrande), the usual column of pruning papers.
    """
    lm_eval = require_lm_eval()
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="grail-tasks-") as tmp:
        if data_dir is not None:
            names = write_local_tasks(Path(data_dir), Path(tmp), tasks)
            manager = TaskManager(include_path=tmp, include_defaults=False)
        else:
            names = {task: task for task in tasks}
            manager = TaskManager()
        try:
            # The harness records the git commit of the current folder, and git prints "fatal: not a
            # git repository" outside one; GRAIL's results record their own versions instead.
            with mock.patch.object(evaluator, "get_git_commit_hash", lambda: None):
                output = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=list(names.values()),
                    num_fewshot=0,
                    limit=limit,
                    task_manager=manager,
                    bootstrap_iters=0,
                    log_samples=False,
                )
        except (OSError, ConnectionError) as err:
            raise GrailError(
                f"zero-shot tasks could not be loaded ({err}); without network access pass --data_dir."
            ) from None
    per_task = {}
    for task, name in names.items():
        metrics = output["results"][name]
        per_task[task] = {"acc": metrics["acc,none"], "acc_norm": metrics.get("acc_norm,none")}
    accs = [m["acc"] for m in per_task.values()]
    norms = [m["acc_norm"] if m["acc_norm"] is not None else m["acc"] for m in per_task.values()]
    return {
        "tasks": per_task,
        "mean_acc": sum(accs) / len(accs),
        "mean_acc_norm": sum(norms) / len(norms),
        "limit": limit,
        "source": "offline" if data_dir is not None else "hub",
    }


def format_table(result: dict) -> str:
    """The zero-shot results as a small console table."""
    lines = [
        f"zero-shot ({'first ' + str(result['limit']) + ' examples per task' if result['limit'] else 'all examples'})"
    ]
    lines.append(f"  {'task':15s} {'acc':>7s} {'acc_norm':>9s}")
    for task, m in result["tasks"].items():
        norm = f"{m['acc_norm']:.4f}" if m["acc_norm"] is not None else "-"
        lines.append(f"  {task:15s} {m['acc']:7.4f} {norm:>9s}")
    lines.append(f"  {'mean':15s} {result['mean_acc']:7.4f} {result['mean_acc_norm']:9.4f}")
    return "\n".join(lines)
