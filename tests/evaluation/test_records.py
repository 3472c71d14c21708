"""evaluation/records.py: the files round-trip, old files read through the one reader, the dry-run and table lines."""

import json

import pytest

from d3hr_ray.evaluation.records import (
    RESULTS_VERSION,
    EvaluationPlan,
    EvaluationResults,
    RepeatResult,
    format_plan,
    table_row,
)
from tests.evaluation.conftest import a_repeat, some_results

# A repeat file and a results.json as evaluate wrote them before --labels, train_refused and settings existed
# (json.dumps(rec, indent=2) of a dict, no "version"), abridged to one repeat.
OLD_REPEAT = {
    "seed": 3,
    "best_top1": 0.625,
    "best_top5": 0.875,
    "best_epoch": 2,
    "final_top1": 0.5,
    "train_images": 10,
    "test_images": 449,
    "train_set": {"source": "out/distilled"},
    "history": [{"epoch": 2, "top1": 0.625, "top5": 0.875}],
    "wall_s": 12.0,
}
OLD_RESULTS = {
    "label": "D3HR, IPC 1",
    "method": "distilled",
    "student": "conv3",
    "teacher": "teacher",
    "teacher_test_top1": 0.97,
    "ipc": 1.0,
    "repeats": 1,
    "top1_mean": 62.5,
    "top1_std": 0.0,
    "top5_mean": 87.5,
    "top5_std": 0.0,
    "per_repeat": [OLD_REPEAT],
    "config": {"distilled": "out", "student": "conv3"},
    "command": "python -m d3hr_ray.evaluate --distilled out",
    "device": "CPU",
    "torch": "2.4.0",
    "ray": "2.40.0",
    "wall_s": 30.0,
}


def test_a_new_file_is_the_old_layout_with_a_version_and_round_trips():
    rep = a_repeat(seed=2, best_top1=0.75)
    data = json.loads(rep.to_json())
    assert list(data) == ["version", *RepeatResult.__dataclass_fields__]  # the order the old dicts had
    assert data["version"] == RESULTS_VERSION and data["best_top1"] == 0.75 and data["settings"]["labels"] == "kd"
    assert RepeatResult.from_json(rep.to_json()) == rep
    res = some_results("random real, IPC 2", "soft", 2, [50.0, 70.0], command="cmd")
    assert EvaluationResults.from_json(res.to_json()) == res
    written = json.loads(res.to_json())
    assert written["labels"] == "soft" and written["ipc"] == 2 and "version" not in written["per_repeat"][0]
    assert res.to_json().decode() == json.dumps(
        {"version": RESULTS_VERSION, **written}, indent=2
    )  # indent 2, as before


def test_old_files_are_read_with_the_values_they_were_computed_with():
    res = EvaluationResults.from_json(json.dumps(OLD_RESULTS, indent=2))
    assert res.labels == "kd"  # written before --labels: the paper's regime, the only one then
    (rep,) = res.per_repeat
    assert rep.seed == 3 and rep.best_top1 == 0.625 and rep.history == OLD_REPEAT["history"]
    assert rep.train_refused is None and rep.settings is None  # not recorded then, and not made up
    assert res.top1 == [62.5] and res.set_name == "D3HR"
    # A repeat file with settings from before --labels: its settings say kd, so a kd rerun accepts it.
    stored = RepeatResult.from_json(json.dumps({**OLD_REPEAT, "settings": {"epochs": 4}}))
    assert stored.settings == {"labels": "kd", "epochs": 4}
    # Another JSON file is refused naming what it lacks; one from a newer d3hr_ray is refused, not misread.
    with pytest.raises(ValueError, match="not a results.json of evaluate: it lacks command, config"):
        EvaluationResults.from_json(
            json.dumps({k: v for k, v in OLD_RESULTS.items() if k not in ("command", "config")})
        )
    with pytest.raises(ValueError, match=r"repeat file has version 99; this d3hr_ray reads versions 1 to 2: upgrade"):
        RepeatResult.from_json(json.dumps({"version": 99, **OLD_REPEAT}))


def test_table_row_and_plan_lines():
    res = some_results("herding, IPC 2", "soft", 2, [50.0, 70.0], command="python -m d3hr_ray.evaluate x")
    assert table_row(res) == (
        "| herding, IPC 2 | conv3 | soft | 2 | 60.0 ± 10.0 | 90.0 ± 0.0 | 2 | `python -m d3hr_ray.evaluate x` |"
    )
    full = some_results("full real data", "hard", None, [80.0], command=None)
    assert table_row(full) == "| full real data | conv3 | hard | all | 80.0 ± 0.0 | 90.0 ± 0.0 | 1 |  |"
    plan = EvaluationPlan(
        teacher=None,
        teacher_arch=None,
        teacher_weights=None,
        classes=10,
        resolution=16,
        train="digits:train (random real, IPC 2)",
        train_images=20,
        train_classes=10,
        test_images=449,
        student="conv3",
        labels="hard",
        lr=1e-3,
        epochs=1200,
        batch_size=8,
        steps_per_epoch=3,
        steps=3600,
        repeats=3,
    )
    assert format_plan(plan).splitlines()[1:] == [
        "train     digits:train (random real, IPC 2): 20 images in 10 of 10 classes",
        "test      449 images",
        "student   conv3 at 16 px, hard labels, AdamW lr 0.001",
        "teacher   none (hard labels)",
        "steps     1,200 epochs x 3 batches of 8 = 3,600 steps a repeat, 3 repeat(s)",
    ]
