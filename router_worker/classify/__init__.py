"""Classifier engines behind one batch interface."""

from router_worker.classify.engine import Engine, Prediction

__all__ = ["Engine", "Prediction"]
