"""Test and demo helpers: tiny models, synthetic checkpoints, demo assets."""
