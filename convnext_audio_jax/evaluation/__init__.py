"""Scoring a model on labelled data: the evaluation engine, its metrics, and teacher predictions."""
