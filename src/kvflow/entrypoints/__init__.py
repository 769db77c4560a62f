"""Entry points: the `kvflow` command line."""
