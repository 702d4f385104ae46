"""Judging an upsampler: image metrics and the held-out evaluator run during training."""
