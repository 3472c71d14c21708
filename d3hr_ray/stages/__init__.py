"""The method, one stage per module, pure torch (never Ray): encode, invert, stats, select, generate.

This file imports nothing heavy: the job configs read the constants below without loading torch.
"""

# The VAE posterior for stage 1: a seeded sample (the reference's) or its mean.
ENCODE_MODES = ("sample", "mean")
