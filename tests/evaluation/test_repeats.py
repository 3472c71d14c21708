"""evaluation/repeats.py without Ray: the stored repeats a rerun takes or refuses, and the summary of repeats.

(Running a repeat is a Ray Train run: tests/test_evaluate.py.)"""

import dataclasses
import json

import numpy as np
import pytest

from d3hr_ray.evaluation.config import EvaluateConfig
from d3hr_ray.evaluation.records import RepeatResult
from d3hr_ray.evaluation.repeats import RepeatStore, Setup, summarise
from d3hr_ray.storage.fs import OutputDir
from tests.evaluation.conftest import a_repeat

CFG = EvaluateConfig(baseline="random-real", real="digits:train", ipc=2, teacher="t", epochs=4, eval_every=2, repeats=3)


def test_finished_repeats_are_taken_and_other_settings_refused(tmp_path):
    out = OutputDir(str(tmp_path))
    settings = CFG.result_settings()
    assert settings["eval_every"] == 2 and settings["crop_scale"] == [0.08, 1.0]  # JSON values, as stored
    store = RepeatStore(out, settings)
    same = a_repeat(seed=0, settings=settings)
    store.write(same)
    # seed 1: a file from before settings were stored (taken as is); seed 2: not computed yet
    old = {k: v for k, v in json.loads(a_repeat(seed=1).to_json()).items() if k not in ("version", "settings")}
    (tmp_path / "repeats" / "seed-1.json").write_text(json.dumps(old, indent=2))
    found = store.finished(CFG.seeds)
    assert sorted(found) == [0, 1] and found[0] == same and found[1].settings is None
    # Settings from before --labels mean kd: a kd rerun takes the repeat, a hard one is refused naming labels.
    no_labels = {k: v for k, v in settings.items() if k != "labels"}
    store.write(a_repeat(seed=2, settings=no_labels))
    assert store.finished(CFG.seeds)[2].settings == settings
    hard = dataclasses.replace(CFG, labels="hard")
    with pytest.raises(ValueError, match=r"seed-0.json holds a repeat computed with other settings \(labels differ\)"):
        RepeatStore(out, hard.result_settings()).finished(hard.seeds)


def test_summary_is_the_mean_and_population_std_in_percent():
    setup = Setup(False, 0.0, {"class_names": list("abcd"), "test_top1": 0.9}, 4, 16, "kd", None, None, 10, 2, "cmd")
    reps = [a_repeat(seed=s, best_top1=t, best_top5=t + 0.1) for s, t in ((0, 0.5), (1, 0.6), (2, 0.85))]
    res = summarise(CFG, setup, reps)
    assert res.top1_mean == pytest.approx(65.0) and res.top1_std == pytest.approx(np.std([50, 60, 85]))
    assert res.top5_mean == pytest.approx(75.0) and res.repeats == 3 and res.per_repeat == tuple(reps)
    assert res.label == res.method == "random real, IPC 2" and (res.ipc, res.command, res.device) == (2, "cmd", "CPU")
    assert res.teacher_test_top1 == 0.9 and RepeatResult.from_json(reps[0].to_json()) == reps[0]
    # A distilled set: its IPC is its images over the classes it holds (a file from before "classes": all of K).
    distilled = EvaluateConfig(distilled="out", teacher="t")
    holds = a_repeat(train_images=9, train_set={"source": "out", "classes": 3})
    assert summarise(distilled, setup, [holds]).ipc == 3
    assert summarise(distilled, setup, [a_repeat(train_images=9, train_set={"source": "out"})]).ipc == 2.25
    assert summarise(distilled, setup, [holds]).label == "out"
