"""Discrete-event simulator of a kvflow cluster; runs the same policy objects as kvflow.cluster."""
