"""d3hr_ray/__init__.py: the method exported by name, resolved on first use."""

import pytest


def test_the_package_still_exports_the_method_by_name():
    import d3hr_ray
    from d3hr_ray.stages.select import select_group
    from d3hr_ray.stages.stats import ClassStats

    assert d3hr_ray.select_group is select_group and d3hr_ray.ClassStats is ClassStats
    for name in d3hr_ray.__all__:
        assert getattr(d3hr_ray, name) is not None
    with pytest.raises(AttributeError):
        d3hr_ray.not_a_name  # noqa: B018
