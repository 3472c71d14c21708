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
>= 0, score >= A. The search runs in two passes that stay on the compute device:

1. A of every candidate, block by block (BLOCK candidates from generators keyed by (seed, block)),
   into one (m,) float32 tensor: 4 bytes a candidate, no host read.
2. Exact scores (float64) of the sub-blocks of 16 candidates that hold the k smallest A (their U drawn
   from a generator keyed by (seed, block, sub-block); the block's (mbar, Q) drawn again from its
   generator), k = 4, 16, 64, ... until the (k+1)-th smallest A, less a float margin, is above the best
   exact score: no candidate left can beat it. The host reads the k indices and one (best, index, next
   bound) triple a round; one or two rounds in the usual case, more when the skew term dominates.

The winner is the exact argmin over the same m candidates (ties to the lowest index), which are
distributed exactly like plain draws; the skew term is evaluated for a handful of them. The bound is
applied to all m candidates at once, on the device, so the host waits for the device a few times per
class, not once a block.

Determinism: the stream is a function of (seed, m, P, D), `BLOCK` and the device type (CPU and CUDA
generators differ), never of the number of threads or workers. Memory: O(BLOCK * D) per thread, plus
4 bytes a candidate for the bounds (4 MB at m = 10^6).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from d3hr_ray.seeding import derive_seed, generator

if TYPE_CHECKING:
    _T = TypeVar("_T")
    _R = TypeVar("_R")

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
# Candidates (smallest bounds first) whose sub-blocks are scored in the first round of the exact search; x4 a round.
_FIRST_LOOK = 4


def check_weights(weights: Sequence[float]) -> tuple[float, float, float]:
    """Validate (l_mu, l_sd, l_sk): three finite numbers >= 0."""
    w = tuple(float(x) for x in weights)
    if len(w) != 3 or not all(math.isfinite(x) and x >= 0 for x in w):
        raise ValueError(f"score weights must be three finite numbers >= 0 (l_mu, l_sd, l_sk), got {tuple(weights)}")
    return w


def group_score(
    groups: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, weights: Sequence[float] = (1.0, 1.0, 0.1)
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
    # A dimension without spread in the group (real latents can tie; Gaussian draws never do) has no deviation
    # to standardise: it adds 0 to the skew instead of 0/0.
    z = torch.where(s.unsqueeze(-2) > 0, (groups - m.unsqueeze(-2)) / s.unsqueeze(-2), 0.0)  # (..., P, D)
    skew = d / ((d - 1) * (d - 2)) * (z**3).sum(dim=-1)  # (..., P)
    return score + l_sk * skew.norm(dim=-1)


def _directions(seed: int, block: int, sub: int, n: int, p: int, d: int, device: torch.device | str) -> torch.Tensor:
    """U for the n candidates of sub-block `sub` of block `block`: (n, P, D) float64.

    Each (candidate, dimension) column is a uniform unit vector orthogonal to the all-ones vector: an
    isotropic Gaussian projected onto that subspace and normalised.
    """
    z = torch.randn(n, p, d, generator=generator(seed, "direction", block, sub, device=device), device=device)
    z = z.to(torch.float64)
    z = z - z.mean(dim=1, keepdim=True)  # (n, P, D): project out the all-ones direction
    return z / z.norm(dim=1, keepdim=True)


def _standard_gamma(
    shape: tuple[int, int], alpha: float, seed: int, block: int, device: torch.device | str, use_numpy: bool
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


def _block_draws(
    seed: int, b: int, nb: int, p: int, d: int, device: torch.device | str, use_numpy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sufficient statistics of block b's candidates.

    Returns:
        mbar: (nb, D) float32, mean_P(eps) ~ N(0, 1/P).
        q: (nb, D) float32, sum_p (eps_p - mbar)^2 ~ chi2(P - 1); None for P = 1.
    """
    g = generator(seed, "block", b, device=device)
    mbar = torch.randn(nb, d, generator=g, device=device) / math.sqrt(p)
    q = 2 * _standard_gamma((nb, d), (p - 1) / 2, seed, b, device, use_numpy) if p > 1 else None
    return mbar, q


def _bounds(
    mbar: torch.Tensor, q: torch.Tensor | None, var32: torch.Tensor, p: int, w: tuple[float, float, float]
) -> torch.Tensor:
    """A = l_mu * |sd * mbar| + l_sd * |sd * (sqrt(Q / (P-1)) - 1)|: a lower bound on each score, (nb,) float32."""
    l_mu, l_sd, _ = w
    a = ((mbar * mbar) @ var32).sqrt_().mul_(l_mu)  # (nb,): l_mu * |sd * mbar|
    if q is not None:
        dev = (q / (p - 1)).sqrt_().sub_(1)  # (nb, D): std_P(eps) - 1
        a = a.add_(((dev * dev) @ var32).sqrt_(), alpha=l_sd)
    return a


def _sub_block(
    mbar: torch.Tensor, q: torch.Tensor | None, sub: int, *, seed: int, b: int, p: int, d: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Sub-block `sub` of block b from its block's (mbar, q): mbar (n, D) float64, and for P > 1 (Q (n, D), U (n, P, D))
    float64 (None for P = 1, which has neither)."""
    lo, hi = sub * _SUB_BLOCK, min((sub + 1) * _SUB_BLOCK, mbar.shape[0])
    mb = mbar[lo:hi].to(torch.float64)  # (n, D)
    if q is None:  # P = 1
        return mb, None
    return mb, (q[lo:hi].to(torch.float64), _directions(seed, b, sub, hi - lo, p, d, mbar.device))


def _sub_block_scores(
    mbar: torch.Tensor,
    q: torch.Tensor | None,
    sub: int,
    *,
    seed: int,
    b: int,
    p: int,
    d: int,
    sd64: torch.Tensor,
    w: tuple[float, float, float],
) -> torch.Tensor:
    """Exact float64 scores (n,) of sub-block `sub` of block b from its block's (mbar, q)."""
    l_mu, l_sd, l_sk = w
    mb, spread = _sub_block(mbar, q, sub, seed=seed, b=b, p=p, d=d)
    full = l_mu * (sd64 * mb).norm(dim=-1)  # (n,)
    if spread is None:  # P = 1: the mean term alone
        return full
    qs, u = spread  # (n, D), (n, P, D)
    full = full + l_sd * (sd64 * ((qs / (p - 1)).sqrt() - 1)).norm(dim=-1)
    # skew_p = D/((D-1)(D-2)) * sum_d ((P-1)^(3/2) * U[p, d])^3: class-free
    skew = d / ((d - 1) * (d - 2)) * ((p - 1) ** 1.5 * u**3).sum(dim=-1)  # (n, P)
    return full + l_sk * skew.norm(dim=-1)


def _sub_block_eps(
    mbar: torch.Tensor, q: torch.Tensor | None, sub: int, *, seed: int, b: int, p: int, d: int
) -> torch.Tensor:
    """The standard-normal draws eps (n, P, D) float64 of sub-block `sub` of block b: eps = mbar + sqrt(Q) * U."""
    mb, spread = _sub_block(mbar, q, sub, seed=seed, b=b, p=p, d=d)
    if spread is None:  # P = 1
        return mb.unsqueeze(1)  # (n, 1, D)
    qs, u = spread
    return mb.unsqueeze(1) + qs.sqrt().unsqueeze(1) * u


def select_group(
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    ipc: int,
    candidates: int,
    seed: int,
    weights: Sequence[float] = (1.0, 1.0, 0.1),
    threads: int | None = None,
) -> tuple[torch.Tensor, float]:
    """D3HR stage 4: the best of `candidates` random groups of `ipc` latents for one class.

    Exact argmin of `group_score` over `candidates` i.i.d. groups from N(mean, diag(std^2)), found
    by the sufficient-statistics sampling and the two-pass search described in this module's docstring;
    memory stays O(BLOCK * D) per thread plus 4 bytes a candidate (10^6 and more).

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
    use_numpy = device.type == "cpu"
    sd64 = std.to(torch.float64)
    var32 = std.to(torch.float32) ** 2
    n_blocks = -(-candidates // BLOCK)
    n_threads = 1 if device.type != "cpu" else max(1, min(threads or torch.get_num_threads(), n_blocks))

    def draws(b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _block_draws(seed, b, min(BLOCK, candidates - b * BLOCK), ipc, d, device, use_numpy)

    def each(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        if n_threads == 1 or len(items) < 2:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(min(n_threads, len(items))) as pool:
            return list(pool.map(fn, items))

    # 1. Every candidate's lower bound A, block by block, into one device tensor (4 bytes a candidate).
    bound = torch.empty(candidates, dtype=torch.float32, device=device)

    def fill(b: int) -> None:
        mbar, q = draws(b)
        bound[b * BLOCK : b * BLOCK + mbar.shape[0]] = _bounds(mbar, q, var32, ipc, w)

    each(fill, list(range(n_blocks)))

    # 2. Exact scores of the sub-blocks that hold the k smallest bounds, k growing until the (k+1)-th smallest
    # bound (with the float margin) is above the best exact score: then no candidate left can beat it.
    # The host reads the k indices and, per round, one (score, index, bound) triple.
    scored: dict[tuple[int, int], torch.Tensor] = {}  # (block, sub-block) -> its exact scores (n,) float64
    k = min(candidates, _FIRST_LOOK)
    while True:
        low, idx = torch.topk(bound, min(k + 1, candidates), largest=False, sorted=True)
        wanted: dict[int, set[int]] = {}  # block -> its sub-blocks not scored yet
        for j in idx[:k].tolist():
            b, sub = j // BLOCK, (j % BLOCK) // _SUB_BLOCK
            if (b, sub) not in scored:
                wanted.setdefault(b, set()).add(sub)

        def score_block(b: int, wanted: Any = wanted) -> list[Any]:
            mbar, q = draws(b)
            return [
                ((b, sub), _sub_block_scores(mbar, q, sub, seed=seed, b=b, p=ipc, d=d, sd64=sd64, w=w))
                for sub in sorted(wanted[b])
            ]

        for pairs in each(score_block, sorted(wanted)):
            scored.update(pairs)
        keys = sorted(scored)  # candidate order, so that argmin's first minimum is the lowest index
        flat = torch.cat([scored[key] for key in keys])  # (scored,)
        nxt = low[k].to(torch.float64) if k < candidates else torch.tensor(math.inf, dtype=torch.float64, device=device)
        best_v, i, next_v = torch.stack([flat.min(), flat.argmin().to(torch.float64), nxt]).tolist()
        if k >= candidates or next_v * (1 - _PRUNE_MARGIN) > best_v:
            break
        k = min(candidates, k * 4)
    # The winner: its sub-block's eps rebuilt from the same generators.
    i, start = int(i), 0
    for b, sub in keys:
        if i < start + scored[b, sub].numel():
            break
        start += scored[b, sub].numel()
    mbar, q = draws(b)
    eps = _sub_block_eps(mbar, q, sub, seed=seed, b=b, p=ipc, d=d)  # (n, P, D)
    r = i - start
    out_dtype = torch.promote_types(mean.dtype, torch.float32)
    group = mean.to(torch.float64) + sd64 * eps[r]  # (P, D)
    return group.to(out_dtype), best_v


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
    weights: Sequence[float] = (1.0, 1.0, 0.1),
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
    if best_rows is None:
        raise ValueError("no candidate group has a finite score: the latents or the statistics hold NaN or inf")
    return best_rows, best_score
