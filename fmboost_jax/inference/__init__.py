"""Boosting images with a trained upsampler: `Upsampler`, `load_upsampler`."""
