"""Evaluation: datasets and metrics (the harness grows here)."""
