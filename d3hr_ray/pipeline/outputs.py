"""The distilled set on disk (local or s3://): statistics, latents, images, Parquet, grid, manifest.

Every file is written atomically through `OutputDir`. Formats:
- stats.safetensors: mean (C, D) float32, var (C, D) float32, count (C,) int64; metadata strings.
- latents.safetensors: latents (C*IPC, c, h, w) float32 (the selected z_K), labels (C*IPC,) int64.
- images/<class>/<k>.png; distilled.parquet (image: PNG bytes, label: int64, class: string).
- grid.png: up to 10 classes x 10 images, a row per class, labelled; manifest.json.
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch

from d3hr_ray.io.fs import OutputDir, read_bytes

__all__ = ["DistilledWriter", "read_stats", "write_manifest", "write_stats"]


def write_stats(out: OutputDir, mean: np.ndarray, var: np.ndarray, count: np.ndarray, metadata: dict) -> str:
    from safetensors.torch import save

    blob = save(
        {"mean": torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32)),
         "var": torch.from_numpy(np.ascontiguousarray(var, dtype=np.float32)),
         "count": torch.from_numpy(np.ascontiguousarray(count, dtype=np.int64))},
        metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()},
    )
    return out.write_bytes("stats.safetensors", blob)


def read_stats(uri: str) -> tuple[dict[str, np.ndarray], dict]:
    """stats.safetensors (local or s3://) -> ({mean, var, count} numpy arrays, metadata with JSON values decoded)."""
    from safetensors.torch import load

    blob = read_bytes(uri)
    tensors = {k: v.numpy() for k, v in load(blob).items()}
    missing = {"mean", "var", "count"} - set(tensors)
    if missing:
        raise ValueError(f"--from-stats {uri}: not a statistics file (missing {sorted(missing)})")
    # The metadata is in the file's JSON header: 8 bytes of length, then the header.
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    meta = {}
    for k, v in (header.get("__metadata__") or {}).items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta


class DistilledWriter:
    """Streams generated rows to images/, distilled.parquet and the in-memory latents/grid.

    Memory: the latents of the distilled set (C * IPC * D float32) and up to 100 grid thumbnails;
    never the source data set.
    """

    def __init__(self, out: OutputDir, names: dict[int, str], ipc: int, latent_shape: tuple[int, int, int]):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.out, self.names, self.ipc, self.latent_shape = out, names, ipc, latent_shape
        self.order = {c: i for i, c in enumerate(sorted(names))}
        d = int(np.prod(latent_shape))
        self.latents = np.zeros((len(names) * ipc, d), dtype=np.float32)
        self.labels = np.repeat(np.array(sorted(names), dtype=np.int64), ipc)
        self.filled = np.zeros(len(names) * ipc, dtype=bool)
        self.grid: dict[tuple[int, int], bytes] = {}
        self.grid_classes = set(sorted(names)[:10])
        self.schema = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("class", pa.string())])
        self.parquet_tmp = out.scratch(".parquet")
        self.writer = pq.ParquetWriter(self.parquet_tmp, self.schema)
        self.scores: dict[int, float] = {}
        self.select_s = 0.0
        self.generate_s = 0.0

    def add(self, batch: dict) -> None:
        import pyarrow as pa

        labels, ks = batch["label"], batch["k"]
        for c, k, png, lat, score in zip(labels, ks, batch["png"], batch["latent"], batch["score"]):
            c, k = int(c), int(k)
            self.out.write_bytes(f"images/{self.names[c]}/{k}.png", bytes(png))
            pos = self.order[c] * self.ipc + k
            self.latents[pos] = lat
            self.filled[pos] = True
            self.scores[c] = float(score)
            if c in self.grid_classes and k < 10:
                self.grid[(c, k)] = bytes(png)
        self.select_s += float(np.sum(batch["select_s"]))
        self.generate_s += float(np.sum(batch["generate_s"]))
        table = pa.table(
            {"image": [bytes(p) for p in batch["png"]], "label": labels.astype(np.int64), "class": [self.names[int(c)] for c in labels]},
            schema=self.schema,
        )
        self.writer.write_table(table)

    def close(self) -> list[str]:
        """Finish every file; returns their locations. Raises if an image is missing."""
        from safetensors.torch import save

        self.writer.close()
        if not self.filled.all():
            missing = sorted({int(self.labels[i]) for i in np.flatnonzero(~self.filled)})
            raise RuntimeError(f"generation returned no images for classes {missing}")
        written = [self.out.write_file("distilled.parquet", self.parquet_tmp)]
        blob = save({
            "latents": torch.from_numpy(self.latents).view(-1, *self.latent_shape),
            "labels": torch.from_numpy(self.labels),
        })
        written.append(self.out.write_bytes("latents.safetensors", blob))
        written.append(self.out.write_bytes("grid.png", self._grid_png()))
        return written

    def _grid_png(self) -> bytes:
        from PIL import Image, ImageDraw, ImageFont

        classes = sorted(c for c in self.grid_classes)
        thumbs = {key: Image.open(io.BytesIO(png)).convert("RGB") for key, png in self.grid.items()}
        side = max(32, max((im.size[0] for im in thumbs.values()), default=32))
        side = min(side, 128)
        margin, gap = 90, 2
        cell = side + gap
        cols = min(10, self.ipc)
        canvas = Image.new("RGB", (margin + cols * cell, max(1, len(classes)) * cell), "white")
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default()
        for r, c in enumerate(classes):
            draw.text((4, r * cell + side // 2 - 6), str(self.names[c])[:14], fill="black", font=font)
            for k in range(cols):
                im = thumbs.get((c, k))
                if im is not None:
                    im = im.resize((side, side), Image.Resampling.NEAREST if im.size[0] < side else Image.Resampling.LANCZOS)
                    canvas.paste(im, (margin + k * cell, r * cell))
        buf = io.BytesIO()
        canvas.save(buf, format="PNG")
        return buf.getvalue()


def write_manifest(out: OutputDir, manifest: dict) -> str:
    return out.write_bytes("manifest.json", (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
