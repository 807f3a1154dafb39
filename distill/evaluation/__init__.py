"""Evaluation of a trained (or teacher) role on a prompt file: sampled videos
named as VBench expects, and metrics whose networks the user has on disk."""
