"""Input data without Ray: decoding and preprocessing images (stage 1's first half)."""
