"""`python -m d3hr_ray.evaluate`: docs/method.md stage 6, a student trained on a distilled (or baseline) set.

    train set   --distilled (a distill output folder, or any ImageFolder/Parquet), or a baseline on the
                real --real data: --baseline random-real --ipc K (K random images per class, seeded per
                repeat), herding or k-center --ipc K (coresets chosen per class from the --teacher's
                features, evaluation/coresets.py), or full; the chosen keys go to <output>/sets/
    student     from the registry (--student), fresh weights, seeded
    protocol    RandomResizedCrop(0.08-1) + flip, CutMix (Beta(1, 1)), AdamW (weight decay 0.01 on
                weights only), cosine schedule; every knob is a flag. --labels picks the targets:
                kd (default, the paper's): softmax(teacher / 20) of the frozen --teacher on each mixed
                batch, KL loss; soft: the teacher's targets of each un-augmented image, computed once and
                mixed by CutMix; hard: the class labels, cross-entropy (no teacher needed)
    result      best test top-1 (and the top-5 of that evaluation) per repeat on the real --test set;
                results.json (every repeat, mean and std, config, timings) and results.md (a table row)

Ray Train: TorchTrainer over --num-workers (DDP, GPUs when the cluster has them); each repeat is a run
named <name>-seed<seed> with a checkpoint at every evaluation; rerunning the same command skips the
finished repeats (their results are in --output) and resumes the unfinished one.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from dataclasses import asdict

from d3hr_ray import tracking
from d3hr_ray.cli import main_for
from d3hr_ray.diagnose.figure import learning_curves
from d3hr_ray.evaluation.config import BASELINES, CHOOSERS, EVALUATIONS_PER_RUN, LABELS, RESULT_KEYS, EvaluateConfig
from d3hr_ray.evaluation.records import EvaluationPlan, EvaluationResults, format_plan, table_row
from d3hr_ray.storage.fs import OutputDir
from d3hr_ray.training import harness

__all__ = ["BASELINES", "EVALUATIONS_PER_RUN", "LABELS", "RESULT_KEYS", "EvaluateConfig", "main", "run"]


def run(cfg: EvaluateConfig, command: str | None = None) -> EvaluationResults | EvaluationPlan:
    """Evaluate: the results (results.json, results.md; logged to MLflow with --mlflow), or with --dry-run the plan."""
    # Torch and Ray load here, not when this module is imported: the job's flags parse and --help prints without them.
    from d3hr_ray.evaluation import repeats
    from d3hr_ray.evaluation.baselines import Chooser
    from d3hr_ray.evaluation.plan import plan

    if cfg.dry_run:
        return plan(cfg)
    # Start Ray; resolve what every repeat shares (classes, teacher, test set):
    harness.use_train_v2()
    setup = repeats.prepare(cfg, harness.start_ray(cfg.use_gpu), command)
    # The repeats this output already holds (a refused rerun stops here, before touching the MLflow run):
    out = OutputDir(cfg.output)
    store = repeats.RepeatStore(out, cfg.result_settings())
    finished = store.finished(cfg.seeds)
    with tracking.tracked(
        cfg.mlflow, out, "d3hr_ray.evaluate", cfg.name, asdict(cfg), experiment_flag=cfg.mlflow_experiment
    ) as mlflow_run:
        # Every repeat: as stored, or trained on Ray Train and stored:
        done = []
        with tempfile.TemporaryDirectory(prefix="d3hr-eval-") as scratch:
            chooser = (
                Chooser(cfg, setup.names, setup.k, setup.teacher_ref, scratch) if cfg.baseline in CHOOSERS else None
            )
            for i, seed in enumerate(cfg.seeds):
                step = f"repeat {i + 1}/{cfg.repeats} (seed {seed})"
                rec = finished.get(seed)
                if rec is not None:
                    print(f"{step}: already done, top-1 {rec.best_top1:.4f}", flush=True)
                else:
                    rec = repeats.run_repeat(cfg, setup, seed, chooser, store, mlflow_run)
                    store.write(rec)
                    print(f"{step}: best top-1 {rec.best_top1:.4f} at epoch {rec.best_epoch}", flush=True)
                done.append(rec)
        # Their mean and std: results.json, results.md, and MLflow:
        results = repeats.summarise(cfg, setup, done)
        out.write_bytes("results.json", results.to_json())
        out.write_bytes("results.md", (table_row(results) + "\n").encode())
        _log(mlflow_run, out, results)
    return results


def _log(mlflow_run: tracking.MLflowRun | None, out: OutputDir, results: EvaluationResults) -> None:
    """The summary metrics, results.json and results.md, and the repeats' learning curves."""
    summary = {
        "top1_mean": results.top1_mean,
        "top1_std": results.top1_std,
        "top5_mean": results.top5_mean,
        "top5_std": results.top5_std,
    }
    tracking.log_metrics(mlflow_run, summary)
    for name in ("results.json", "results.md"):
        tracking.log_artifact(mlflow_run, name, out.read(name))
    curves = learning_curves([(f"seed {x.seed}", x.history) for x in results.per_repeat], results.label)
    if curves is not None:
        tracking.log_artifact(mlflow_run, "top1-by-epoch.png", curves)


def _report(cfg: EvaluateConfig, outcome: EvaluationResults | EvaluationPlan) -> int:
    if isinstance(outcome, EvaluationPlan):
        print(format_plan(outcome))
        return 0
    print(
        f"{outcome.method}, {outcome.student}, {outcome.labels} labels: top-1 {outcome.top1_mean:.2f} ± "
        f"{outcome.top1_std:.2f} over {outcome.repeats} repeat(s)"
    )
    print(table_row(outcome))
    print(f"output: {cfg.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    harness.use_train_v2()  # before anything imports ray.train
    args = sys.argv[1:] if argv is None else list(argv)
    command = "python -m d3hr_ray.evaluate " + shlex.join(args)
    return main_for(
        args,
        cls=EvaluateConfig,
        run=lambda cfg: run(cfg, command=command),
        report=_report,
        prog="python -m d3hr_ray.evaluate",
        description=__doc__,
    )


if __name__ == "__main__":
    raise SystemExit(main())
