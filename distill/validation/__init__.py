"""Validation: fixed-seed samples, media and quality metrics during training."""
