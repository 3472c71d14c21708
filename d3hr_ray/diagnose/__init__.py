"""Diagnostics a user runs on models, distilled sets and results: `python -m d3hr_ray.diagnose <name>`.

agreement  does a trained model know its classes? (a real-data classifier judges its samples)
sets       distilled sets through a teacher: fidelity, confidence, diversity, test coverage
latents    where a class model loses the class: round trips, Gaussian draws, shuffled latents
figure     top-1 against IPC from evaluate's results, a panel per label regime
compare    evaluate's results as a table, each row with Welch's t-test against a reference row
"""
