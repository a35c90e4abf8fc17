"""Checkpoints and interchange formats."""
