"""kvflow: an LLM inference and serving engine."""
from kvflow.llm import LLM
from kvflow.outputs import CompletionOutput, RequestOutput
from kvflow.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
