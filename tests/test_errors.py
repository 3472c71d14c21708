"""errors.check_version: the one reader of the format version every file of the package states."""

import pytest

from d3hr_ray.errors import check_version


def test_versions_up_to_the_newest_are_read_as_ints():
    assert [check_version(v, 2, "x") for v in (1, 2, "1", "2")] == [1, 2, 1, 2]


@pytest.mark.parametrize("found", [3, "3", "2.0", "two", True, None, 2.0])
def test_a_newer_or_malformed_version_is_refused_naming_the_file(found):
    with pytest.raises(ValueError) as err:
        check_version(found, 2, "the thing.json")
    assert str(err.value) == (
        f"the thing.json has version {found!r}; this d3hr_ray reads versions 1 to 2: upgrade d3hr_ray"
    )
