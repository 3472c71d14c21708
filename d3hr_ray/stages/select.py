"""D3HR stage 4: group sampling. Pick the most representative group of P latents for a class.

For class statistics (mu, sd), draw m candidate groups G of P latents i.i.d. from N(mu, diag(sd^2))
and keep the one with the lowest

    score(G) = l_mu * |mean_P(G) - mu|_2 + l_sd * |std_P(G) - sd|_2 + l_sk * |skew(G)|_2,
    skew(G)_p = D / ((D-1)(D-2)) * sum_d ((G[p,d] - mean_P(G)_d) / std_P(G)_d)^3      (a (P,) vector).

With P = 1 the std and skew terms are undefined; the score is the mean term alone.

How `select_group` gets the same objective at a fraction of the cost
--------------------------------------------------------------------
Write a candidate as G = mu + sd * eps, eps (P, D) standard normal. Per dimension, the P draws of a
Gaussian split into three independent parts (Cochran's theorem):

    mbar = mean_P(eps) ~ N(0, 1/P),   Q = sum_p (eps_p - mbar)^2 ~ chi2(P - 1),
    U    = (eps - mbar) / sqrt(Q)     uniform on the unit sphere of {u in R^P : sum_p u_p = 0},

and eps = mbar + sqrt(Q) * U. In these terms

    mean term = |sd * mbar|,   std term = |sd * (sqrt(Q / (P-1)) - 1)|,
    skew term = |D/((D-1)(D-2)) * sum_d ((P-1)^(3/2) * U[:, d]^3)|     (no mu, no sd: class-free).

So a candidate is drawn as (mbar, Q): 2 numbers per dimension instead of P, and its first two terms
are two weighted norms, A = l_mu * |sd*mbar| + l_sd * |sd*(sqrt(Q/(P-1)) - 1)|. Since the skew term is
>= 0, score >= A: U (P numbers per dimension) is drawn only for candidates whose A is below the best
full score found so far (branch and bound, with a float margin), from a generator keyed by the
candidate's index. The winner is the exact argmin over the same m candidates, which are distributed
exactly like plain draws; the skew term is evaluated for a handful of them.

Determinism: the stream is a function of (seed, m, P, D) and `BLOCK`, never of threads or devices'
count. Memory: O(BLOCK * D) per thread, whatever m is.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from d3hr_ray.seeding import generator

__all__ = ["group_score", "select_group", "check_weights", "BLOCK"]

# Candidates per random block. Part of the definition of a seed's stream: changing it changes which
# group a seed selects (not the distribution), so it is a constant, not a tuning knob.
BLOCK = 256
# Relative float32 error allowed for A before a candidate is pruned (A is a sum of D terms in float32).
_PRUNE_MARGIN = 1e-4


def check_weights(weights) -> tuple[float, float, float]:
    """Validate (l_mu, l_sd, l_sk): three finite numbers >= 0."""
    w = tuple(float(x) for x in weights)
    if len(w) != 3 or not all(math.isfinite(x) and x >= 0 for x in w):
        raise ValueError(f"score weights must be three finite numbers >= 0 (l_mu, l_sd, l_sk), got {tuple(weights)}")
    return w


def group_score(
    groups: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, weights=(1.0, 1.0, 0.1)
) -> torch.Tensor:
    """D3HR stage 4's score of candidate groups, straight from the definition.

    Args:
        groups: (..., P, D) float candidate groups.
        mean: (D,) class mean mu.
        std: (D,) class standard deviation sd.
        weights: (l_mu, l_sd, l_sk).
    Returns:
        (...) scores in the groups' dtype; with P = 1 only the mean term.
    """
    l_mu, l_sd, l_sk = check_weights(weights)
    p, d = groups.shape[-2:]
    mean, std = mean.to(groups), std.to(groups)
    m = groups.mean(dim=-2)  # (..., D)
    score = l_mu * (m - mean).norm(dim=-1)  # (...)
    if p == 1:
        return score
    if d < 3:
        raise ValueError(f"the skew term needs D >= 3, got D={d}")
    s = groups.std(dim=-2)  # (..., D), unbiased
    score = score + l_sd * (s - std).norm(dim=-1)
    z = (groups - m.unsqueeze(-2)) / s.unsqueeze(-2)  # (..., P, D)
    skew = d / ((d - 1) * (d - 2)) * (z**3).sum(dim=-1)  # (..., P)
    return score + l_sk * skew.norm(dim=-1)


class _Best:
    """The running argmin over candidates, shared by the block threads: (score, index, eps)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.score, self.index, self.eps = math.inf, -1, None

    def offer(self, score: float, index: int, eps: torch.Tensor) -> None:
        with self.lock:
            if (score, index) < (self.score, self.index) or self.index < 0:
                self.score, self.index, self.eps = score, index, eps


def _skew_norm(u: torch.Tensor, p: int, d: int) -> float:
    """|skew| of a group from its unit directions U (P, D): D/((D-1)(D-2)) * sum_d ((P-1)^1.5 U)^3."""
    skew = d / ((d - 1) * (d - 2)) * ((p - 1) ** 1.5 * u**3).sum(dim=-1)  # (P,)
    return skew.norm().item()


def _direction(seed: int, index: int, p: int, d: int, device) -> torch.Tensor:
    """U for candidate `index`: (P, D) float64, each column a uniform unit vector orthogonal to 1."""
    z = torch.randn(p, d, generator=generator(seed, "direction", index, device=device), device=device)
    z = z.to(torch.float64)
    z = z - z.mean(dim=0, keepdim=True)  # project out the all-ones direction
    return z / z.norm(dim=0, keepdim=True)


def _run_block(b: int, *, seed, m, p, d, sd32, var32, sd64, w, best: _Best, device) -> None:
    l_mu, l_sd, l_sk = w
    start = b * BLOCK
    nb = min(BLOCK, m - start)
    g = generator(seed, "block", b, device=device)
    mbar = torch.randn(nb, d, generator=g, device=device) / math.sqrt(p)  # (nb, D): mean_P(eps)
    a = l_mu * ((mbar * mbar) @ var32).sqrt()  # (nb,): l_mu * |sd * mbar|
    if p > 1:
        shape = torch.full((nb, d), (p - 1) / 2, device=device)
        q = 2 * torch._standard_gamma(shape, generator=g)  # (nb, D): chi2(P-1) sums of squares
        dev = (q / (p - 1)).sqrt_().sub_(1)  # (nb, D): std_P(eps) - 1
        a = a + l_sd * ((dev * dev) @ var32).sqrt()
    order = torch.argsort(a).tolist()
    a_host = a.tolist()
    for j in order:
        if a_host[j] * (1 - _PRUNE_MARGIN) > best.score:
            break  # every later candidate in this block has A (a lower bound on its score) above the best
        mb = mbar[j].to(torch.float64)  # (D,)
        full = l_mu * (sd64 * mb).norm().item()
        if p == 1:
            eps = mb.unsqueeze(0)  # (1, D)
        else:
            qj = q[j].to(torch.float64)  # (D,)
            full += l_sd * (sd64 * ((qj / (p - 1)).sqrt() - 1)).norm().item()
            u = _direction(seed, start + j, p, d, device)  # (P, D)
            full += l_sk * _skew_norm(u, p, d)
            eps = mb + qj.sqrt() * u  # (P, D): eps = mbar + sqrt(Q) * U
        best.offer(full, start + j, eps)


def select_group(
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    ipc: int,
    candidates: int,
    seed: int,
    weights=(1.0, 1.0, 0.1),
    threads: int | None = None,
) -> tuple[torch.Tensor, float]:
    """D3HR stage 4: the best of `candidates` random groups of `ipc` latents for one class.

    Exact argmin of `group_score` over `candidates` i.i.d. groups from N(mean, diag(std^2)), found
    by the sufficient-statistics sampling described in this module's docstring; memory stays
    O(BLOCK * D) per thread for any `candidates` (10^6 and more).

    Args:
        mean: (D,) class mean, float, on the device to compute on.
        std: (D,) class standard deviation (>= 0).
        ipc: P, images per class.
        candidates: m, the number of candidate groups.
        seed: the stream's seed; derive it from (global seed, class id), e.g. with
            `derive_seed(seed, "select", class_id)`, so any worker gets the same result.
        weights: (l_mu, l_sd, l_sk); D3HR's reference code uses (1, 1, 0.1).
        threads: CPU threads scoring blocks in parallel (default: torch.get_num_threads()); the
            result does not depend on it.
    Returns:
        group: (ipc, D) in mean's float dtype (float32 at least), the chosen latents.
        score: its score (float, computed in float64).
    """
    w = check_weights(weights)
    if mean.ndim != 1 or std.shape != mean.shape:
        raise ValueError(f"mean and std must both be (D,), got {tuple(mean.shape)} and {tuple(std.shape)}")
    if ipc < 1 or candidates < 1:
        raise ValueError(f"ipc and candidates must be >= 1, got ipc={ipc}, candidates={candidates}")
    d = mean.numel()
    if ipc > 1 and d < 3:
        raise ValueError(f"the skew term needs D >= 3, got D={d}")
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()) or (std < 0).any():
        raise ValueError("mean and std must be finite and std >= 0")
    device = mean.device
    sd64 = std.to(torch.float64)
    sd32 = std.to(torch.float32)
    var32 = sd32 * sd32
    best = _Best()
    n_blocks = -(-candidates // BLOCK)
    kw = dict(seed=seed, m=candidates, p=ipc, d=d, sd32=sd32, var32=var32, sd64=sd64, w=w, best=best, device=device)
    n_threads = 1 if device.type != "cpu" else max(1, min(threads or torch.get_num_threads(), n_blocks))
    if n_threads == 1:
        for b in range(n_blocks):
            _run_block(b, **kw)
    else:
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(lambda b: _run_block(b, **kw), range(n_blocks)))
    out_dtype = torch.promote_types(mean.dtype, torch.float32)
    group = mean.to(torch.float64) + sd64 * best.eps  # (P, D)
    return group.to(out_dtype), best.score
