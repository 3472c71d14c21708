"""Helpers for the evaluation records' tests and their readers (diagnose compare, figure): results.json files
written as `evaluate` writes them."""

from d3hr_ray.evaluation.records import EvaluationResults, RepeatResult


def a_repeat(seed: int = 0, best_top1: float = 0.5, **fields) -> RepeatResult:
    """A repeat with plausible numbers; `fields` override any."""
    values = {
        "seed": seed,
        "best_top1": best_top1,
        "best_top5": min(1.0, best_top1 + 0.3),
        "best_epoch": 4,
        "final_top1": best_top1,
        "train_images": 20,
        "train_refused": 0,
        "test_images": 449,
        "train_set": {"source": "digits:train", "selected": 20, "classes_with_fewer": {}},
        "history": [{"epoch": 2, "top1": best_top1 / 2}, {"epoch": 4, "top1": best_top1}],
        "settings": {"labels": "kd", "epochs": 4, "crop_scale": [0.08, 1.0]},
        "wall_s": 1.5,
    }
    return RepeatResult(**{**values, **fields})


def some_results(label: str, labels: str, ipc: float | None, top1: list[float], **fields) -> EvaluationResults:
    """The results of repeats with these best top-1s (%), their mean and std as `evaluate` computes them."""
    reps = tuple(a_repeat(seed=i, best_top1=t / 100) for i, t in enumerate(top1))
    mean = sum(top1) / len(top1)
    values = {
        "label": label,
        "method": label,
        "labels": labels,
        "student": "conv3",
        "teacher": "teacher",
        "teacher_test_top1": 0.9,
        "ipc": ipc,
        "repeats": len(top1),
        "top1_mean": mean,
        "top1_std": (sum((t - mean) ** 2 for t in top1) / len(top1)) ** 0.5,
        "top5_mean": 90.0,
        "top5_std": 0.0,
        "per_repeat": reps,
        "config": {"student": "conv3", "labels": labels},
        "command": None,
        "device": "CPU",
        "torch": "2.0",
        "ray": "2.0",
        "wall_s": 3.0,
    }
    return EvaluationResults(**{**values, **fields})


def write_results(path, *args, **fields) -> str:
    """`some_results(*args, **fields)` written to `path` as results.json; the path as a str."""
    path.write_bytes(some_results(*args, **fields).to_json())
    return str(path)
