"""Experiment tracking behind a small protocol (MLflow, or nothing)."""

from casa_megatron.tracking.mlflow_tracker import MLflowTracker, NullTracker, make_tracker

__all__ = ["MLflowTracker", "NullTracker", "make_tracker"]
