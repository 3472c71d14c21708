"""training/choices.py: the torch-free names the configs check are exactly the registries' keys."""

from d3hr_ray.evaluation.coresets import CORESETS
from d3hr_ray.training.choices import CORESET_RULES, STUDENT_LRS
from d3hr_ray.training.students import STUDENTS


def test_the_names_are_the_registries():
    assert list(STUDENTS) == list(STUDENT_LRS)
    assert all(STUDENTS[n].lr == STUDENT_LRS[n] for n in STUDENTS)
    assert tuple(CORESETS) == CORESET_RULES  # the paper's learning rates: tests/training/test_students.py
