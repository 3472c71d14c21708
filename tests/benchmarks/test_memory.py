"""benchmarks/memory.py's pieces: the synthetic Parquet source it distils and the peak-RSS reader."""

import os

import pyarrow.parquet as pq

from benchmarks.memory import _peak_rss, _write_parquet
from d3hr_ray.data.sources import list_source


def test_synthetic_parquet_is_a_valid_source(tmp_path):
    path = tmp_path / "data.parquet"
    _write_parquet(path, 2500)
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 2500 and meta.num_row_groups == 3  # row groups of 1,000
    listing = list_source(str(path), model_names=None, num_model_classes=10, classes=None, shard_size=1024)
    assert listing.counts == {c: 250 for c in range(10)} and listing.names[3] == "class_3"
    assert sum(s.inputs for s in listing.shards) == 2500


def test_peak_rss_reads_this_process():
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    assert _peak_rss(os.getpid()) >= hwm > 0
    assert _peak_rss(2**22 + 12345) is None  # no such process
