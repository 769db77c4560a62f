"""Structured output: grammars from StructuredOutputsParams (grammar.py), each request's matcher
(matcher.py), the step's token bitmask (bitmask.py), and tool calls as schemas (tools.py)."""
