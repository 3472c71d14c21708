"""What the README and docs tell a newcomer: the method page they can open, an install line that works from a
checkout, the hub id of DiT-XL/2, what has been measured; and no pointer to the spec outside the repository."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What users read: the README, docs/, jobs/ and the package (help texts, docstrings, error messages).
USER_FACING = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "jobs").rglob("*.yaml")]
USER_FACING += [*(REPO / "jobs").glob("*.sh"), *(REPO / "d3hr_ray").rglob("*.py"), REPO / "jobs" / "README.md"]


def test_users_are_pointed_at_docs_method_md_not_a_file_outside_the_repository():
    cited = [str(p.relative_to(REPO)) for p in USER_FACING if "D3HR.md" in p.read_text()]
    assert cited == []
    assert "## Stage 6" in (REPO / "docs" / "method.md").read_text()  # the protocol evaluate follows is there
    for p in USER_FACING:  # every docs/ link in them resolves
        for target in re.findall(r"docs/[\w-]+\.md", p.read_text()):
            assert (REPO / target).is_file(), (p, target)


def test_the_readme_install_line_names_extras_that_exist_and_the_hub_id():
    readme = (REPO / "README.md").read_text()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    lines = re.findall(r"pip install -e '\.\[(\w+)\]'", readme)
    assert "mlflow" in lines and set(lines) <= set(extras)
    assert "pip install 'd3hr_ray" not in readme  # not on the index
    assert "facebook/DiT-XL-2-256" in readme
    top = readme[: readme.index("## Set up and run")]  # measured and not measured, before anything to run
    assert "digits" in top and "Fashion-MNIST" in top and "H200" in top and "no ImageNet-1K accuracy" in top


def test_every_jobs_help_says_nothing_of_d3hr_md():
    for job in ("distill", "evaluate", "train_teacher", "finetune"):
        out = subprocess.run(
            [sys.executable, "-m", f"d3hr_ray.{job}", "--help"], capture_output=True, text=True, check=True
        ).stdout
        assert "D3HR.md" not in out and "--help" in out, job
