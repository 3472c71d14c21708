"""The student-training protocol of docs/method.md stage 6 (from RDED), pure torch.

Per batch: RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) and a horizontal flip per image, then CutMix
(lambda ~ Beta(1, 1)) over the batch; the frozen teacher labels the *mixed* images,
targets = softmax(teacher(x_mix) / T), and the student minimises KL(targets || softmax(student(x_mix) / T))
averaged over the batch (T = 20): the "kd" regime. Two more regimes judge the data rather than the teacher
(docs/evaluate.md, "Label regimes"): "soft", fixed soft labels (the teacher labels each un-augmented image
once; CutMix mixes those stored targets by area, `mix_targets`), and "hard", cross-entropy on the class
labels (CutMix mixes the one-hot labels). AdamW with weight decay on weights only (tensors of rank >= 2:
conv and linear kernels; biases and norm parameters are not decayed), cosine learning rate per epoch.

Randomness is drawn on the CPU from a numpy Generator for a whole global batch, so every worker of a
data-parallel run computes the same augmentation for the same image, whatever the number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "FLIP_P",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentParams",
    "apply_augment",
    "batch_plan",
    "cosine_factor",
    "cut_box",
    "draw_augment",
    "kd_loss",
    "mix_targets",
    "normalize",
    "param_groups",
    "soft_cross_entropy",
    "soft_targets",
    "topk_correct",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Probability of the horizontal flip of each image (torchvision's RandomHorizontalFlip, as RDED).
FLIP_P = 0.5


class AugmentParams:
    """One global batch's augmentation: crop boxes, flips, and the CutMix partner and box.

    Attributes (B = global batch size):
        boxes: (B, 4) float64 crop (top, left, height, width) as fractions of the image side.
        flip: (B,) bool.
        partner: (B,) int64 position, within the global batch, of the image pasted into each one (CutMix).
        cut: (4,) float64 CutMix box (top, left, height, width) as fractions; height 0 = no CutMix.
    """

    def __init__(self, boxes: np.ndarray, flip: np.ndarray, partner: np.ndarray, cut: np.ndarray):
        self.boxes, self.flip, self.partner, self.cut = boxes, flip, partner, cut


def _crop_boxes(
    rng: np.random.Generator, n: int, scale: tuple[float, float], ratio: tuple[float, float], tries: int = 10
) -> np.ndarray:
    """torchvision's RandomResizedCrop rule on a unit square: area ~ U(scale), log aspect ~ U(log ratio),
    the first of `tries` draws that fits; the whole image if none does. Returns (n, 4) top, left, h, w."""
    area = rng.uniform(scale[0], scale[1], size=(n, tries))
    logr = rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, tries))
    w = np.sqrt(area * np.exp(logr))
    h = np.sqrt(area / np.exp(logr))
    fits = (w <= 1.0) & (h <= 1.0)
    first = np.where(fits.any(axis=1), fits.argmax(axis=1), -1)
    u = rng.uniform(size=(n, 2))
    out = np.zeros((n, 4))
    for i in range(n):
        if first[i] < 0:
            out[i] = (0.0, 0.0, 1.0, 1.0)
        else:
            hh, ww = h[i, first[i]], w[i, first[i]]
            out[i] = (u[i, 0] * (1 - hh), u[i, 1] * (1 - ww), hh, ww)
    return out


def draw_augment(
    rng: np.random.Generator,
    n: int,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = FLIP_P,
    cutmix_alpha: float = 1.0,
    cutmix_p: float = 1.0,
) -> AugmentParams:
    """All random numbers of one global batch of n images (same on every worker for the same rng state)."""
    boxes = _crop_boxes(rng, n, scale, ratio)
    flip = rng.uniform(size=n) < flip_p
    partner = rng.permutation(n).astype(np.int64)
    cut = np.zeros(4)
    if cutmix_alpha > 0 and rng.uniform() < cutmix_p:
        lam = rng.beta(cutmix_alpha, cutmix_alpha)
        side = math.sqrt(1.0 - lam)  # the pasted box covers 1 - lam of the area
        cy, cx = rng.uniform(size=2)
        top, bottom = np.clip([cy - side / 2, cy + side / 2], 0.0, 1.0)
        left, right = np.clip([cx - side / 2, cx + side / 2], 0.0, 1.0)
        cut = np.array([top, left, bottom - top, right - left])
    return AugmentParams(boxes, flip, partner, cut)


def _crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear crop-and-resize of each image's box to size x size: x (B, C, H, W), boxes (B, 4) fractions."""
    b = x.shape[0]
    top, left, h, w = boxes.unbind(1)
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = w
    theta[:, 0, 2] = 2 * left + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * top + h - 1
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def apply_augment(x: torch.Tensor, p: AugmentParams, rows: np.ndarray, size: int) -> torch.Tensor:
    """The augmented, CutMixed images at global-batch positions `rows`.

    Args:
        x: (B, C, H, W) float, the whole global batch (every worker holds it: distilled sets are small).
        p: the batch's AugmentParams.
        rows: (b,) int positions this worker trains on.
        size: output side.
    Returns:
        (b, C, size, size), same dtype as x.
    """

    def view(idx: np.ndarray) -> torch.Tensor:
        idx_t = torch.as_tensor(idx, device=x.device)
        v = _crop_resize(x[idx_t], torch.as_tensor(p.boxes[idx], dtype=x.dtype, device=x.device), size)
        flip = torch.as_tensor(p.flip[idx], device=x.device).view(-1, 1, 1, 1)
        return torch.where(flip, v.flip(-1), v)

    out = view(rows)
    box = cut_box(p, size)
    if box is not None:
        y0, y1, x0, x1 = box
        other = view(p.partner[rows])
        out = out.clone()
        out[:, :, y0:y1, x0:x1] = other[:, :, y0:y1, x0:x1]
    return out


def cut_box(p: AugmentParams, size: int) -> tuple[int, int, int, int] | None:
    """The CutMix box in pixels of a size x size output, (y0, y1, x0, x1); None when nothing is pasted."""
    top, left, h, w = (float(v) for v in p.cut)
    if not (h > 0 and w > 0):
        return None
    y0, y1 = round(top * size), round((top + h) * size)
    x0, x1 = round(left * size), round((left + w) * size)
    return (y0, y1, x0, x1) if y1 > y0 and x1 > x0 else None


def mix_targets(targets: torch.Tensor, p: AugmentParams, rows: np.ndarray, size: int) -> torch.Tensor:
    """The targets of the CutMixed images at global-batch positions `rows`: each image's own target and its
    partner's, weighted by the area each covers in the output (the pasted box's pixels over size^2).

    Args:
        targets: (B, K) float, one target distribution per image of the whole global batch.
        p, rows, size: as for `apply_augment`.
    Returns:
        (b, K) float32.
    """
    idx = torch.as_tensor(rows, device=targets.device)
    own = targets[idx].float()
    box = cut_box(p, size)
    if box is None:
        return own
    y0, y1, x0, x1 = box
    pasted = (y1 - y0) * (x1 - x0) / size**2
    other = targets[torch.as_tensor(p.partner[rows], device=targets.device)].float()
    return (1.0 - pasted) * own + pasted * other


def soft_targets(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(teacher_logits / T): (B, K) -> (B, K) float32."""
    return torch.softmax(teacher_logits.float() / temperature, dim=1)


def kd_loss(
    student_logits: torch.Tensor, targets: torch.Tensor, temperature: float, denominator: float | None = None
) -> torch.Tensor:
    """sum_i KL(targets_i || softmax(student_i / T)) / denominator (default: the batch size): 'batchmean'.

    A data-parallel worker passes the global batch size (times 1 / world size, see `batch_plan`), so
    the gradients DDP averages are those of the global batch mean.
    """
    logq = torch.log_softmax(student_logits.float() / temperature, dim=1)
    kl = (targets * (torch.log(targets.clamp_min(1e-30)) - logq)).sum()
    return kl / (denominator if denominator is not None else student_logits.shape[0])


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, denominator: float | None = None) -> torch.Tensor:
    """sum_i -<targets_i, log_softmax(logits_i)> / denominator (default: the batch size).

    With one-hot targets this is the cross-entropy on the labels; with CutMixed one-hot targets (`mix_targets`)
    it is lam * CE(own label) + (1 - lam) * CE(partner's label), the hard-label CutMix loss.
    """
    loss = -(targets.float() * torch.log_softmax(logits.float(), dim=1)).sum()
    return loss / (denominator if denominator is not None else logits.shape[0])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weights (rank >= 2 tensors), none on biases and norm scales/shifts."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_factor(epoch: int, epochs: int) -> float:
    """Learning-rate multiplier of epoch e (0-based) of E: (1 + cos(pi e / E)) / 2."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many rows have their label among the top-k logits, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (B, kmax)
    hit = top == labels.view(-1, 1)
    return [int(hit[:, : min(k, logits.shape[1])].any(dim=1).sum()) for k in ks]


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) or float in [0, 1] -> (x - mean) / std, float32."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def batch_plan(
    n: int, batch_size: int, rng: np.random.Generator, rank: int, world: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One epoch over n images: [(global batch indices, this worker's positions in it)], same on every worker.

    Each global batch (a shuffle of 0..n-1 cut into batch_size pieces) is split into `world` nearly equal
    runs; a tail batch smaller than `world` is left out of this epoch (a different one each epoch).
    """
    order = rng.permutation(n)
    plan = []
    for s in range(0, n, batch_size):
        idx = order[s : s + batch_size]
        if len(idx) < world:
            continue
        plan.append((idx, np.array_split(np.arange(len(idx)), world)[rank]))
    return plan
