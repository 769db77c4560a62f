"""Speculative decoding: proposers guess tokens, the target verifies them in the same flat batch."""
