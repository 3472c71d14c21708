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
>= 0, score >= A: U (P numbers per dimension) is drawn only for the sub-blocks of 16 candidates
that hold a candidate whose A is below the best full score found so far (branch and bound, with a
float margin), from a generator keyed by (seed, block, sub-block). The winner is the exact argmin
over the same m candidates, which are distributed exactly like plain draws; the skew term is
evaluated for a handful of them.

Determinism: the stream is a function of (seed, m, P, D), `BLOCK` and the device type (CPU and CUDA
generators differ), never of the number of threads or workers. Memory: O(BLOCK * D) per thread,
whatever m is.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from d3hr_ray.seeding import derive_seed, generator

__all__ = [
    "BLOCK",
    "REAL_CHUNK_ELEMENTS",
    "check_weights",
    "group_score",
    "noise_latents",
    "select_group",
    "select_real_group",
]

# Candidates per random block. Part of the definition of a seed's stream: changing it changes which
# group a seed selects (not the distribution), so it is a constant, not a tuning knob.
BLOCK = 256
# Candidates whose exact score is computed together (their directions U share one generator).
_SUB_BLOCK = 16
# select_real_group scores candidate groups in chunks of about this many latent elements (chunk x P x D).
REAL_CHUNK_ELEMENTS = 1 << 22
# Relative float32 error allowed for A before a candidate is pruned (A is a sum of D terms in float32).
_PRUNE_MARGIN = 1e-4


def check_weights(weights) -> tuple[float, float, float]:
    """Validate (l_mu, l_sd, l_sk): three finite numbers >= 0."""
    w = tuple(float(x) for x in weights)
    if len(w) != 3 or not all(math.isfinite(x) and x >= 0 for x in w):
        raise ValueError(f"score weights must be three finite numbers >= 0 (l_mu, l_sd, l_sk), got {tuple(weights)}")
    return w


def group_score(groups: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, weights=(1.0, 1.0, 0.1)) -> torch.Tensor:
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
    # A dimension without spread in the group (real latents can tie; Gaussian draws never do) has no deviation
    # to standardise: it adds 0 to the skew instead of 0/0.
    z = torch.where(s.unsqueeze(-2) > 0, (groups - m.unsqueeze(-2)) / s.unsqueeze(-2), 0.0)  # (..., P, D)
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


def _directions(seed: int, block: int, sub: int, n: int, p: int, d: int, device) -> torch.Tensor:
    """U for the n candidates of sub-block `sub` of block `block`: (n, P, D) float64.

    Each (candidate, dimension) column is a uniform unit vector orthogonal to the all-ones vector: an
    isotropic Gaussian projected onto that subspace and normalised.
    """
    z = torch.randn(n, p, d, generator=generator(seed, "direction", block, sub, device=device), device=device)
    z = z.to(torch.float64)
    z = z - z.mean(dim=1, keepdim=True)  # (n, P, D): project out the all-ones direction
    return z / z.norm(dim=1, keepdim=True)


def _standard_gamma(
    shape: tuple[int, int], alpha: float, seed: int, block: int, device, use_numpy: bool
) -> torch.Tensor:
    """Gamma(alpha, 1) variates (nb, D) float32 for one block, keyed by (seed, block) alone.

    On the CPU numpy's float32 gamma sampler is ~3x faster than torch's (15 vs 42 ns a variate on the
    project's 2-core machine) and runs in parallel threads; on other devices their own generator is used.
    """
    if use_numpy:
        rng = np.random.Generator(np.random.SFC64(derive_seed(seed, "chi2", block)))
        return torch.from_numpy(rng.standard_gamma(alpha, size=shape, dtype=np.float32)).to(device)
    g = generator(seed, "chi2", block, device=device)
    return torch._standard_gamma(torch.full(shape, alpha, device=device), generator=g)


def _block_draws(seed: int, b: int, nb: int, p: int, d: int, device, use_numpy: bool):
    """The sufficient statistics of block b's candidates.

    Returns:
        mbar: (nb, D) float32, mean_P(eps) ~ N(0, 1/P).
        q: (nb, D) float32, sum_p (eps_p - mbar)^2 ~ chi2(P - 1); None for P = 1.
    """
    g = generator(seed, "block", b, device=device)
    mbar = torch.randn(nb, d, generator=g, device=device) / math.sqrt(p)
    q = 2 * _standard_gamma((nb, d), (p - 1) / 2, seed, b, device, use_numpy) if p > 1 else None
    return mbar, q


def _run_block(b: int, *, seed, m, p, d, var32, sd64, w, best: _Best, device) -> None:
    l_mu, l_sd, l_sk = w
    start = b * BLOCK
    nb = min(BLOCK, m - start)
    mbar, q = _block_draws(seed, b, nb, p, d, device, use_numpy=device.type == "cpu")
    a = l_mu * ((mbar * mbar) @ var32).sqrt()  # (nb,): l_mu * |sd * mbar|
    if p > 1:
        dev = (q / (p - 1)).sqrt_().sub_(1)  # (nb, D): std_P(eps) - 1
        a = a + l_sd * ((dev * dev) @ var32).sqrt()
    # Branch and bound: visit candidates by increasing A (a lower bound on the score); the first time
    # a candidate's sub-block is reached, score that whole sub-block exactly (vectorised) and offer its best.
    order = torch.argsort(a).tolist()
    a_host = a.tolist()
    done: set[int] = set()
    for j in order:
        if a_host[j] * (1 - _PRUNE_MARGIN) > best.score:
            break  # every later candidate in this block has A above the best full score
        sub = j // _SUB_BLOCK
        if sub in done:
            continue
        done.add(sub)
        lo, hi = sub * _SUB_BLOCK, min((sub + 1) * _SUB_BLOCK, nb)
        mb = mbar[lo:hi].to(torch.float64)  # (n, D)
        full = l_mu * (sd64 * mb).norm(dim=-1)  # (n,)
        if p == 1:
            eps = mb.unsqueeze(1)  # (n, 1, D)
        else:
            qs = q[lo:hi].to(torch.float64)  # (n, D)
            full = full + l_sd * (sd64 * ((qs / (p - 1)).sqrt() - 1)).norm(dim=-1)
            u = _directions(seed, b, sub, hi - lo, p, d, device)  # (n, P, D)
            # skew_p = D/((D-1)(D-2)) * sum_d ((P-1)^(3/2) * U[p, d])^3: class-free
            skew = d / ((d - 1) * (d - 2)) * ((p - 1) ** 1.5 * u**3).sum(dim=-1)  # (n, P)
            full = full + l_sk * skew.norm(dim=-1)
            eps = mb.unsqueeze(1) + qs.sqrt().unsqueeze(1) * u  # (n, P, D): eps = mbar + sqrt(Q) * U
        i = int(full.argmin())
        best.offer(full[i].item(), start + lo + i, eps[i])


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
    var32 = std.to(torch.float32) ** 2
    best = _Best()
    n_blocks = -(-candidates // BLOCK)
    kw = dict(seed=seed, m=candidates, p=ipc, d=d, var32=var32, sd64=sd64, w=w, best=best, device=device)
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


def noise_latents(ipc: int, dim: int, *, seed: int, class_id: int) -> torch.Tensor:
    """The paper's ablation of group sampling: z_K ~ N(0, I), no class statistics.

    Returns:
        (ipc, dim) float32, drawn from the stream (seed, "noise-latents", class_id) on the CPU.
    """
    return torch.randn((ipc, dim), generator=generator(seed, "noise-latents", int(class_id)))


def select_real_group(
    latents: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    ipc: int,
    candidates: int,
    seed: int,
    weights=(1.0, 1.0, 0.1),
) -> tuple[list[int], float]:
    """D3HR stage 4 on real latents (`distill --candidates-from real`): the best of `candidates` groups of
    `ipc` distinct latents drawn from a class's N inverted real latents, scored by `group_score` against
    the class statistics. The same criterion as `select_group`; only the candidates differ.

    With ipc = 1 every latent is scored (the score is the mean term alone: the latent nearest the class
    mean), so the draw cannot miss the best one. Otherwise candidate g is a uniformly random ipc-subset
    (without replacement) from a generator keyed by (seed, "real-groups", chunk); groups are scored in
    chunks of about REAL_CHUNK_ELEMENTS latent elements, so memory does not grow with `candidates`.

    Args:
        latents: (N, D) the class's inverted latents z_K, in a fixed order (sorted by input key), any float dtype.
        mean, std: (D,) the class statistics.
        seed: derive it from (global seed, class id), e.g. `derive_seed(seed, "select-real", class_id)`.
    Returns:
        (the chosen rows of `latents`, in draw order; the group's score in float32). Ties go to the earliest candidate.
    """
    n, d = latents.shape
    if ipc < 1 or candidates < 1:
        raise ValueError(f"ipc and candidates must be >= 1, got ipc={ipc}, candidates={candidates}")
    if n < ipc:
        raise ValueError(f"the class has {n} real latents, fewer than ipc={ipc}")
    z = latents.to(torch.float32)
    mean, std = mean.to(z), std.to(z)
    if ipc == 1:
        scores = group_score(z.unsqueeze(1), mean, std, weights)  # (N,)
        i = int(torch.argmin(scores))
        return [i], float(scores[i])
    chunk = max(1, REAL_CHUNK_ELEMENTS // (ipc * d))
    best_score, best_rows = math.inf, None
    for c, start in enumerate(range(0, candidates, chunk)):
        size = min(chunk, candidates - start)
        g = generator(seed, "real-groups", c, device=z.device)
        rows = torch.multinomial(torch.ones(size, n, device=z.device), ipc, replacement=False, generator=g)  # (size, P)
        scores = group_score(z[rows], mean, std, weights)  # (size,)
        i = int(torch.argmin(scores))
        if float(scores[i]) < best_score:
            best_score, best_rows = float(scores[i]), rows[i].tolist()
    return best_rows, best_score
