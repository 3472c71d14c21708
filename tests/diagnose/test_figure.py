"""diagnose figure: rows grouped into sets and regimes as written here, and a figure that opens."""

from PIL import Image

from d3hr_ray.diagnose import figure
from tests.evaluation.conftest import write_results


def _res(tmp_path, name, label, labels, ipc, mean, std, repeats=3):
    """A results.json whose summary is (mean, std, repeats); its repeats' own numbers do not enter the figure."""
    return write_results(tmp_path / f"{name}.json", label, labels, ipc, [mean] * repeats, top1_mean=mean, top1_std=std)


def test_rows_join_into_lines_per_regime_and_the_figure_is_written(tmp_path):
    paths = [
        _res(tmp_path, "a", "D3HR, IPC 10", "hard", 10, 70.0, 1.0),
        _res(tmp_path, "b", "D3HR, IPC 1", "hard", 1, 40.0, 2.0, 5),
        _res(tmp_path, "c", "random real, IPC 1", "hard", 1, 45.0, 3.0, 5),
        _res(tmp_path, "d", "random real, IPC 10", "kd", 10, 78.0, 0.5),
        _res(tmp_path, "e", "full real data", "kd", None, 85.5, 0.2),
    ]
    data = figure.collect(paths)
    assert data == {
        "hard": {"D3HR": [(1.0, 40.0, 2.0, 5), (10.0, 70.0, 1.0, 3)], "random real": [(1.0, 45.0, 3.0, 5)]},
        "kd": {"random real": [(10.0, 78.0, 0.5, 3)], "full real data": [(-1.0, 85.5, 0.2, 3)]},
    }
    out = tmp_path / "fig.png"
    figure.draw(data, str(out), "title")
    with Image.open(out) as im:
        w, h = im.size
    assert w > 1.5 * h  # two panels side by side
