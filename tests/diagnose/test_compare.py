"""diagnose/compare.py: rows matched to their reference by regime and IPC; Welch's test from its formula."""

import math

import pytest
from scipy import stats

from d3hr_ray.diagnose import compare
from tests.evaluation.conftest import write_results


def _write(tmp_path, name, label, labels, ipc, top1, command=None):
    return write_results(tmp_path / f"{name}.json", label, labels, ipc, top1, command=command)


def _welch_p(a, b):
    """Two-sided Welch p from the t statistic and the Welch-Satterthwaite degrees of freedom, written out."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    se2 = va / len(a) + vb / len(b)
    t = (ma - mb) / math.sqrt(se2)
    df = se2**2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    return 2 * stats.t.sf(abs(t), df)


def test_rows_against_the_reference_of_their_regime_and_ipc(tmp_path):
    ref10 = [78.0, 78.5, 77.6]
    d3hr10 = [76.1, 77.0, 75.8]
    paths = [
        _write(tmp_path, "a", "random real, IPC 10", "hard", 10, ref10, command="python -m x --label 'a|b'"),
        _write(tmp_path, "b", "D3HR, IPC 10", "hard", 10, d3hr10),
        _write(tmp_path, "c", "D3HR, IPC 1", "hard", 1, [50.0, 52.0]),  # no reference at IPC 1
        _write(tmp_path, "d", "D3HR, IPC 10", "kd", 10, [70.0]),  # no kd reference, one repeat
    ]
    rows = compare.compare_rows(compare.load_rows(paths), "random real")
    by = {(c.row.labels, c.row.ipc, c.row.set_name): c for c in rows}
    d = by[("hard", 10, "D3HR")]
    assert d.diff == pytest.approx(sum(d3hr10) / 3 - sum(ref10) / 3)
    assert d.p == pytest.approx(_welch_p(d3hr10, ref10), rel=1e-9)
    assert d.std == pytest.approx(math.sqrt(sum((x - sum(d3hr10) / 3) ** 2 for x in d3hr10) / 3))  # population std
    assert by[("hard", 10, "random real")].diff is None
    assert by[("hard", 1, "D3HR")].p is None and by[("kd", 10, "D3HR")].p is None
    table = compare.markdown(rows, "random real").splitlines()
    assert table[0].startswith("| set | labels | IPC |") and len(table) == 2 + 4
    assert any(line.startswith("| D3HR | hard | 10 | 76.3 ± 0.5 | 3 | -1.7 |") for line in table)
    detailed = compare.markdown(rows, "random real", details=True).splitlines()
    assert detailed[0].endswith("| per repeat | command |") and detailed[1].count("|") == 10
    ref_line = next(line for line in detailed if line.startswith("| random real | hard | 10 |"))
    assert ref_line.endswith("| 78.0, 78.5, 77.6 | `python -m x --label 'a\\|b'` |")  # a "|" escaped for Markdown
    assert next(line for line in detailed if line.startswith("| D3HR | hard | 10 |")).endswith("| (not recorded) |")
