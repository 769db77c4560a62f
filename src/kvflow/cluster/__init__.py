"""Serving on many instances: dispatch, live migration, prefill/decode split, autoscaling."""
