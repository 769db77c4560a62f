"""Benchmarks: offline throughput (kvflow vs. Hugging Face transformers), datasets, FLOP accounting."""
