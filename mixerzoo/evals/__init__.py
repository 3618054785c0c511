"""Evaluations of a trained HybridLM (docs/paper.md#evaluations): perplexity on a token file, single-needle
retrieval, and lm-evaluation-harness tasks when that package is installed."""

from .cli import add_eval_parser, load_model
from .harness import loglikelihood, run_lm_eval
from .needle import needle_retrieval
from .perplexity import perplexity, read_tokens

__all__ = [
    "add_eval_parser",
    "load_model",
    "loglikelihood",
    "needle_retrieval",
    "perplexity",
    "read_tokens",
    "run_lm_eval",
]
