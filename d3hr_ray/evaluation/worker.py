"""The Ray Train worker loop shared by `train_teacher` (hard labels) and `evaluate` (the D3HR student protocol).

One loop, two objectives:
    "ce"  cross-entropy on the true labels (a teacher on the real data);
    "kd"  D3HR.md stage 6: KL to the frozen teacher's softened outputs on the same CutMixed batch.

Data: when the training set fits the per-worker cache (always for a distilled set), every worker holds
all of it as uint8 and walks the same seeded global batches, training on its own slice of each
(`protocol.batch_plan`): the augmentation of an image is the same whatever the number of workers.
Otherwise the set streams from this worker's Ray Data shard each epoch. The test set (never split)
is cached the same way; each worker scores every world-th batch and the counts are all-reduced.

A checkpoint (model, optimizer, epoch, history, best) is reported at every evaluation; a rerun with
the same run name resumes from the last one.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from d3hr_ray.evaluation.protocol import (
    apply_augment,
    batch_plan,
    cosine_factor,
    draw_augment,
    kd_loss,
    normalize,
    param_groups,
    soft_targets,
    topk_correct,
)
from d3hr_ray.evaluation.students import build_student

__all__ = ["classifier_loop", "load_rows"]


def _usable(shard, batch_size: int):
    """(x (b, 3, R, R) uint8, y (b,) int64, refused count) per batch of a Ray Data iterator of classifier rows."""
    for bt in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        ok = np.asarray(bt["ok"], dtype=bool)
        yield (torch.from_numpy(np.ascontiguousarray(bt["image"][ok])), torch.from_numpy(np.asarray(bt["label"], dtype=np.int64)[ok]),
               int((~ok).sum()))


def load_rows(shard, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every usable row of a Ray Data iterator of classifier rows: (N, 3, R, R) uint8, (N,) int64, refused count."""
    parts = list(_usable(shard, batch_size))
    if not parts:
        return torch.zeros((0, 3, 1, 1), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), 0
    return torch.cat([x for x, _, _ in parts]), torch.cat([y for _, y, _ in parts]), sum(n for _, _, n in parts)


def _stream(shard, batch_size: int):
    for x, y, _ in _usable(shard, batch_size):
        yield x, y


@torch.no_grad()
def _evaluate(model, test, cfg: dict, device, rank: int, world: int) -> tuple[float, float, int]:
    """(top-1, top-5, images scored) of `model` on the whole test set, this worker scoring every world-th batch."""
    import torch.distributed as dist

    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)
    batches = test() if callable(test) else _chunks(*test, cfg["eval_batch_size"])
    for i, (x, y) in enumerate(batches):
        if i % world != rank or len(y) == 0:
            continue
        logits = model(normalize(x.to(device), cfg["mean"], cfg["std"]))
        c1, c5 = topk_correct(logits, y.to(device), ks=(1, 5))
        counts += torch.tensor([c1, c5, len(y)], dtype=torch.float64)
    if world > 1:
        counts = counts.to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    n = max(int(counts[2]), 1)
    return float(counts[0]) / n, float(counts[1]) / n, int(counts[2])


def _chunks(x, y, size):
    for s in range(0, len(y), size):
        yield x[s : s + size], y[s : s + size]


def _resume(model, opt_state_holder: dict) -> tuple[int, list, dict]:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return 0, [], {}
    from safetensors.torch import load_file

    with ckpt.as_directory() as d:
        model.load_state_dict(load_file(str(Path(d) / "model.safetensors")))
        opt_state_holder["state"] = torch.load(Path(d) / "optimizer.pt", weights_only=True)
        state = json.loads((Path(d) / "state.json").read_text())
    return state["epoch"] + 1, state["history"], state["best"]


def classifier_loop(cfg: dict) -> None:
    """Ray Train worker. cfg: see `train_teacher` / `evaluate` (objective, arch, num_classes, resolution, epochs, ...)."""
    import ray
    import ray.train
    import ray.train.torch
    from safetensors.torch import save_file

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.get("torch_threads"):
        torch.set_num_threads(cfg["torch_threads"])
    torch.manual_seed(cfg["seed"])
    R = cfg["resolution"]
    model = build_student(cfg["arch"], cfg["num_classes"], R)
    holder: dict = {}
    start, history, best = _resume(model, holder)
    if start >= cfg["epochs"] and history:  # finished before (a rerun): hand the last checkpoint back as the result
        with ray.train.get_checkpoint().as_directory() as d:
            ray.train.report(dict(history[-1], best_top1=best["top1"], best_top5=best["top5"], best_epoch=best["epoch"]),
                             checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
        return
    if world > 1 and device.type == "cuda":  # batch statistics over the global batch; before the DDP wrap
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=cfg["lr"])
    if holder.get("state"):
        opt.load_state_dict(holder["state"])
    teacher = None
    if cfg["objective"] == "kd":
        meta, state = ray.get(cfg["teacher_ref"])
        teacher = build_student(meta["arch"], meta["num_classes"], R)
        teacher.load_state_dict(state)
        teacher.to(device).eval().requires_grad_(False)

    train_shard = ray.train.get_dataset_shard("train")
    cached, refused = cfg["cache_train"], None
    if cached:
        x_all, y_all, refused = load_rows(train_shard)
        n_train = len(y_all)
    test_shard = ray.train.get_dataset_shard("test")
    test = load_rows(test_shard)[:2] if cfg["cache_test"] else (lambda: _stream(test_shard, cfg["eval_batch_size"]))

    aug = {"scale": tuple(cfg["crop_scale"]), "flip_p": 0.5, "cutmix_alpha": cfg["cutmix_alpha"], "cutmix_p": cfg["cutmix_p"]}
    T = cfg["temperature"]
    train_s, seen_since = 0.0, 0  # training time and images since the last evaluation (its rate is reported)
    for epoch in range(start, cfg["epochs"]):
        for g in opt.param_groups:
            g["lr"] = cfg["lr"] * cosine_factor(epoch, cfg["epochs"])
        model.train()
        t0, seen, total = time.perf_counter(), 0, 0.0
        if cached:
            rng = np.random.default_rng([cfg["seed"], epoch])
            batches = ((x_all[idx], y_all[idx], draw_augment(rng, len(idx), **aug), rows, len(idx) / world)
                       for idx, rows in batch_plan(n_train, cfg["batch_size"], rng, rank, world))
        else:
            rng = np.random.default_rng([cfg["seed"], epoch, rank])
            local = max(1, cfg["batch_size"] // world)
            batches = ((x, y, draw_augment(rng, len(y), **aug), np.arange(len(y)), float(len(y)))
                       for x, y in _stream(train_shard, local) if len(y) > 0)
        for xb, yb, params, rows, denom in batches:
            xm = apply_augment(normalize(xb.to(device), cfg["mean"], cfg["std"]), params, rows, R)  # (b, 3, R, R)
            logits = model(xm)
            if teacher is not None:
                with torch.no_grad():
                    targets = soft_targets(teacher(xm), T)
                loss = kd_loss(logits, targets, T, denominator=denom)
            else:
                y = yb[torch.as_tensor(rows)].to(device)
                loss = torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum") / denom
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(rows)
            total += loss.item() * denom  # this worker's summed loss
        train_s += time.perf_counter() - t0
        seen_since += seen * world
        last = epoch + 1 == cfg["epochs"]
        if not last and (epoch + 1) % cfg["eval_every"] != 0:
            continue
        rate, train_s, seen_since = seen_since / max(train_s, 1e-9), 0.0, 0
        top1, top5, n_test = _evaluate(model, test, cfg, device, rank, world)
        metrics = {"epoch": epoch + 1, "loss": total / max(seen, 1), "top1": top1, "top5": top5, "test_images": n_test,
                   "train_images": n_train if cached else None, "train_refused": refused,
                   "train_images_per_s": rate}
        if not best or top1 > best["top1"]:
            best = {"top1": top1, "top5": top5, "epoch": epoch + 1}
        history.append(metrics)
        metrics = dict(metrics, best_top1=best["top1"], best_top5=best["top5"], best_epoch=best["epoch"])
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                net = model.module if hasattr(model, "module") else model
                save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(Path(d) / "model.safetensors"))
                torch.save(opt.state_dict(), Path(d) / "optimizer.pt")
                (Path(d) / "state.json").write_text(json.dumps({"epoch": epoch, "history": history, "best": best}))
                print(f"[{cfg['objective']}] epoch {epoch + 1}/{cfg['epochs']}: loss {metrics['loss']:.4f}, "
                      f"test top-1 {top1:.4f} (best {best['top1']:.4f}), {metrics['train_images_per_s']:.0f} images/s", flush=True)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
