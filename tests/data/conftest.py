"""Helpers for the data layer's tests: tiny PNGs, a Parquet file with every kind of bad row."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from d3hr_ray.data.preprocess import ImageError, decode_image
from d3hr_ray.data.sources import read_shard

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(value: int, size: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, format="PNG")
    return buf.getvalue()


def rows_of(listing):
    return [r for s in listing.shards for r in read_shard(s)]


def usable(row) -> bool:
    if row["reason"] or row["label"] < 0:
        return False
    try:
        decode_image(row["item"])
        return True
    except ImageError:
        return False


@pytest.fixture
def bad_label_parquet(tmp_path):
    """Rows 0-3 good; then a null image, a struct with null bytes, garbage bytes, labels 12, -1 and null."""
    images = [{"bytes": png(i * 40), "path": f"{i}.png"} for i in range(4)]
    images += [
        None,
        {"bytes": None, "path": "x.png"},
        {"bytes": b"garbage", "path": "g.png"},
        {"bytes": png(1), "path": "a"},
        {"bytes": png(2), "path": "b"},
        {"bytes": png(3), "path": "c"},
    ]
    labels = [0, 1, 2, 1, 0, 1, 2, 12, -1, None]
    meta = {
        "huggingface": json.dumps(
            {
                "info": {
                    "features": {
                        "image": {"_type": "Image"},
                        "label": {"names": ["T-shirt/top", "..", "ü ñ"], "_type": "ClassLabel"},
                    }
                }
            }
        )
    }
    table = pa.table({"image": pa.array(images, IMAGE), "label": pa.array(labels, pa.int64())}).replace_schema_metadata(
        meta
    )
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path, row_group_size=4)
    return path
