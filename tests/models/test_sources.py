"""models/sources.py: which kind of model source a string names, before anything is read."""

import pytest

from d3hr_ray.models.sources import ModelSourceError, builtin_folder, is_hub_id


@pytest.mark.parametrize(
    ("source", "hub"),
    [
        ("facebook/DiT-XL-2-256", True),
        ("someone/some.dit_v2", True),
        ("./models/dit", False),
        ("/abs/models", False),
        ("a/b/c", False),
        ("s3://bucket/prefix", False),
        ("builtin:digits", False),
        ("dit", False),
    ],
)
def test_hub_ids_are_owner_slash_name_and_never_a_path(source, hub):
    assert is_hub_id(source) is hub


def test_builtin_names_map_to_bundled_folders():
    assert builtin_folder("builtin:digits") == "digits"
    assert builtin_folder("digits") is None and builtin_folder("s3://b/builtin:digits") is None
    with pytest.raises(ModelSourceError, match=r"'builtin:Digits'; built-in models: builtin:digits$"):
        builtin_folder("builtin:Digits")
