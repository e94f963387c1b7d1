"""Zero-shot evaluation: local files become the Hub's rows, the harness builds its own prompts
from them, a missing harness is a clear error, and the real model runs end to end."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from grail.cli import main
from grail.errors import GrailError
from grail.evaluate import zero_shot as zs

EXPECTED_ROWS = {
    "boolq": 3270,
    "piqa": 1838,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 2376,
    "arc_challenge": 1172,
}


def test_local_files_become_hub_shaped_rows(data_dir):
    rows = {task: convert(data_dir) for task, convert in zs.CONVERTERS.items()}
    assert {t: len(r) for t, r in rows.items()} == EXPECTED_ROWS
    first = rows["boolq"][0]
    assert set(first) == {"question", "passage", "idx", "label"} and isinstance(first["label"], int)
    # The Hub's super_glue/boolq validation row 0: the passage starts with its title, the answer is "no".
    assert first["question"] == "does ethanol take more energy make that produces"
    assert first["passage"].startswith("Ethanol fuel -- All biomass goes through") and first["label"] == 0
    assert all(isinstance(r["label"], int) and r["label"] in (0, 1) for r in rows["piqa"])
    assert {r["answer"] for r in rows["winogrande"]} == {"1", "2"}
    challenge = rows["arc_challenge"][0]
    assert challenge["id"] == "Mercury_7175875"
    assert challenge["answerKey"] in challenge["choices"]["label"]
    assert all(r["answerKey"] in r["choices"]["label"] for r in rows["arc_easy"])
    hella = rows["hellaswag"][0]
    assert hella["activity_label"] == "Roof shingle removal" and hella["label"] == "3" and len(hella["endings"]) == 4


def test_harness_builds_its_own_prompts_from_the_local_tasks(data_dir, tmp_path):
    from lm_eval.tasks import TaskManager, get_task_dict

    names = zs.write_local_tasks(data_dir, tmp_path)
    tasks = get_task_dict(list(names.values()), TaskManager(include_path=str(tmp_path), include_defaults=False))
    boolq = tasks["grail_boolq"]
    doc = next(iter(boolq.eval_docs))
    assert boolq.doc_to_text(doc) == f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    assert boolq.doc_to_choice(doc) == ["no", "yes"]
    arc = tasks["grail_arc_challenge"]
    doc = next(iter(arc.eval_docs))
    assert arc.doc_to_text(doc) == f"Question: {doc['question']}\nAnswer:"
    assert arc.doc_to_target(doc) == doc["choices"]["label"].index(doc["answerKey"])
    hella = tasks["grail_hellaswag"]
    # The Hub row has ctx_a "A man is sitting on a roof." and ctx_b "he", which the harness capitalises.
    assert next(iter(hella.eval_docs))["query"] == "Roof shingle removal: A man is sitting on a roof. He"


# HellaSwag validation rows 0, 1 and 8 as the Hub has them (rowanz/hellaswag, hellaswag_val.jsonl).
HUB_HELLASWAG = {
    0: {
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "label": "3",
    },
    1: {
        "activity_label": "Clean and jerk",
        "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.",
        "ctx_b": "the lady",
        "endings": [
            "swings and lands in her arms.",
            "pulls the barbell forward.",
            "pulls a rope attached to the barbell.",
            "stands and lifts the weight over her head.",
        ],
        "label": "3",
    },
    8: {
        "activity_label": "Sharpening knives",
        "ctx_a": "A man is holding a pocket knife while sitting on some rocks in the wilderness.",
        "ctx_b": "then he",
        "endings": [
            "opens a can of oil put oil on the knife, and puts oil on a knife and press it through a can filled "
            "with oil then cuts several pieces from the sandwiches.",
            "takes a small stone from the flowing river and smashes it on another stone.",
            "uses the knife to shave his leg.",
            "sand the rocks and tops them by using strong pressure.",
        ],
        "label": "1",
    },
}


def test_hellaswag_requests_equal_the_hub_rows(data_dir, tmp_path):
    """The harness's own hellaswag config gives the same prompt, choices and answer on the Hub rows
    as on the rows converted from the local copy."""
    import lm_eval
    from lm_eval.tasks import TaskManager, get_task_dict

    hub_file = tmp_path / "hub.jsonl"
    hub_rows = [row | {"ind": i, "ctx": f"{row['ctx_a']} {row['ctx_b']}"} for i, row in HUB_HELLASWAG.items()]
    hub_file.write_text("".join(json.dumps(r) + "\n" for r in hub_rows))
    builtin_root = Path(lm_eval.__file__).parent / "tasks"
    (tmp_path / "hub_hellaswag.yaml").write_text(zs.task_config("hellaswag", "hub_hellaswag", hub_file, builtin_root))
    zs.write_local_tasks(data_dir, tmp_path, ("hellaswag",))
    tasks = get_task_dict(
        ["hub_hellaswag", "grail_hellaswag"], TaskManager(include_path=str(tmp_path), include_defaults=False)
    )
    hub_docs = list(tasks["hub_hellaswag"].eval_docs)
    local_docs = list(tasks["grail_hellaswag"].eval_docs)
    task = tasks["hub_hellaswag"]
    for hub_doc, index in zip(hub_docs, HUB_HELLASWAG, strict=True):
        local_doc = local_docs[index]
        assert task.doc_to_text(local_doc) == task.doc_to_text(hub_doc)
        assert task.doc_to_choice(local_doc) == task.doc_to_choice(hub_doc)
        assert task.doc_to_target(local_doc) == task.doc_to_target(hub_doc)
    assert task.doc_to_text(hub_docs[2]).endswith("in the wilderness. Then he")


def test_hellaswag_context_split():
    # A context that ends in a full sentence (WikiHow rows) has no ctx_b; nor has one without a sentence end.
    assert zs.split_hellaswag_context("A man waves. then he") == ("A man waves.", "then he")
    assert zs.split_hellaswag_context("How to sew. Thread the needle.") == ("How to sew. Thread the needle.", "")
    assert zs.split_hellaswag_context("1 a guy") == ("1 a guy", "")
    assert zs.split_hellaswag_context("He waves. Then he") == ("He waves. Then he", "")


def test_missing_harness_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("no lm_eval")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(GrailError, match=r"pip install 'grail\[eval\]'"):
        zs.require_lm_eval()


REFERENCE_ACC = {
    "boolq": 0.4,
    "piqa": 0.8,
    "hellaswag": 0.3,
    "winogrande": 0.5,
    "arc_easy": 0.8,
    "arc_challenge": 0.1,
}


@pytest.mark.slow
def test_smollm2_zero_shot_offline_from_the_command_line(smollm2_dir, data_dir, tmp_path):
    results_file = tmp_path / "r.json"
    args = [
        "--model", str(smollm2_dir), "--pruning_ratio", "0", "--zero_shot", "--zero_shot_limit", "10",
        "--data_dir", str(data_dir), "--eval_batch_size", "8", "--device", "cpu", "--output_json", str(results_file),
        "--quiet",
    ]  # fmt: skip
    assert main(args) == 0
    result = json.loads(results_file.read_text())["zero_shot"]
    assert set(result["tasks"]) == set(zs.TASKS)
    assert result["limit"] == 10 and result["source"] == "offline"
    # measured on the dense SmolLM2-135M with these settings: 10 examples give accuracies in tenths
    accs = {task: metrics["acc"] for task, metrics in result["tasks"].items()}
    assert accs == pytest.approx(REFERENCE_ACC, abs=1e-9)
    assert result["mean_acc"] == pytest.approx(sum(accs.values()) / len(accs))
