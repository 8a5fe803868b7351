"""Experiment tracking behind a small protocol (MLflow, or nothing)."""

from casa_megatron.tracking.mlflow_tracker import (MLflowTracker, NullTracker, close_stale_runs, make_tracker,
                                                   resolve_tracking_uri)

__all__ = ["MLflowTracker", "NullTracker", "close_stale_runs", "make_tracker", "resolve_tracking_uri"]
