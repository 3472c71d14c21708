"""Group selection (D3HR stage 4): candidate groups scored per second, fast vs a straightforward loop.

The straightforward loop is what the reference code does: materialise every candidate group
mu + sd * eps (chunk, P, D), then score it with separate passes for the mean, std and skew terms.
`select_group` optimises the same objective over identically distributed candidates (see
d3hr_ray/stages/select.py). Both run here on the CPU (or --device) with the same D, IPC and weights.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from d3hr_ray.stages.select import group_score, select_group


def straightforward_select(mean, std, *, ipc, candidates, seed, weights=(1.0, 1.0, 0.1), chunk=1000):
    """Reference-style selection: every candidate materialised, each term its own pass.

    Returns:
        (group (ipc, D), score) of the best candidate.
    """
    l_mu, l_sd, l_sk = weights
    g = torch.Generator(device=mean.device).manual_seed(seed)
    d = mean.numel()
    best, best_group = float("inf"), None
    for start in range(0, candidates, chunk):
        n = min(chunk, candidates - start)
        groups = mean + std * torch.randn(n, ipc, d, generator=g, device=mean.device)  # (n, P, D)
        m = groups.mean(dim=1)  # (n, D)
        scores = l_mu * (m - mean).norm(dim=-1)  # (n,)
        if ipc > 1:  # a group of one has no spread: the mean term alone
            s = groups.std(dim=1)  # (n, D)
            scores = scores + l_sd * (s - std).norm(dim=-1)
            z = (groups - m[:, None]) / s[:, None]  # (n, P, D)
            skew = d / ((d - 1) * (d - 2)) * z.pow(3).sum(dim=-1)  # (n, P)
            scores = scores + l_sk * skew.norm(dim=-1)
        i = int(scores.argmin())
        if scores[i].item() < best:
            best, best_group = scores[i].item(), groups[i].clone()
    return best_group, best


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dim", type=int, default=4096, help="D, latent size (4096 = DiT-XL/2 at 256px)")
    p.add_argument("--ipc", type=int, nargs="+", default=[10], help="images per class (P); several allowed")
    p.add_argument("--candidates", type=int, default=100_000, help="m for select_group")
    p.add_argument("--baseline-candidates", type=int, default=4_000, help="m for the straightforward loop")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row; the best is reported")


def _timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def run(args: argparse.Namespace) -> int:
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(args.dim, generator=g).to(dev)
    std = (torch.rand(args.dim, generator=g) + 0.5).to(dev)
    print(
        f"# selection benchmark: D={args.dim}, device={dev}, torch {torch.__version__}, "
        f"threads={torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}"
    )
    print("| IPC | method | candidates | seconds | groups/s | best score | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for ipc in args.ipc:
        t0, (g0, s0) = _timed(
            lambda ipc=ipc: straightforward_select(mean, std, ipc=ipc, candidates=args.baseline_candidates, seed=1),
            args.repeats,
        )
        t1, (g1, s1) = _timed(
            lambda ipc=ipc: select_group(mean, std, ipc=ipc, candidates=args.candidates, seed=1), args.repeats
        )
        # Both report the same objective: recompute each winner's score from scratch in float64.
        for grp, s in ((g0, s0), (g1, s1)):
            check = group_score(grp.double(), mean.double(), std.double()).item()
            assert abs(check - s) <= 1e-4 * abs(check), (check, s)
        r0, r1 = args.baseline_candidates / t0, args.candidates / t1
        print(f"| {ipc} | straightforward loop | {args.baseline_candidates} | {t0:.2f} | {r0:,.0f} | {s0:.3f} | 1.0x |")
        print(f"| {ipc} | select_group | {args.candidates} | {t1:.2f} | {r1:,.0f} | {s1:.3f} | {r1 / r0:.1f}x |")
    return 0
