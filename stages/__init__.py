"""Thin DVC stage entry points: read params, call `jem`, write outputs, log to MLflow."""
