"""lm-evaluation-harness (EleutherAI) tasks for a HybridLM: an adapter to its ``LM`` interface, imported
only when asked for (``pip install lm-eval``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["loglikelihood", "run_lm_eval"]

_HINT = "lm-evaluation-harness is not installed: pip install lm-eval (and transformers for the tokenizer)"


@torch.no_grad()
def loglikelihood(model: nn.Module, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, bool]:
    """Log-probability of ``continuation`` after ``context`` (token ids) under one parallel eval forward,
    and whether it is the greedy continuation. An empty context is not allowed (start with a BOS token)."""
    if not context or not continuation:
        raise ValueError("loglikelihood: context and continuation must both hold at least one token")
    device = next(model.parameters()).device
    ids = torch.tensor([*context, *continuation], device=device)[None, :-1]
    logits, _ = model(ids)
    logp = F.log_softmax(logits[0, -len(continuation) :].float(), -1)  # [n, V]
    target = torch.tensor(continuation, device=device)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def _rolling(model: nn.Module, ids: list[int], bos: int, max_length: int) -> float:
    # whole-text log-likelihood in disjoint windows of max_length, each after a BOS token
    total = 0.0
    for i in range(0, len(ids), max_length - 1):
        chunk = ids[i : i + max_length - 1]
        total += loglikelihood(model, [bos], chunk)[0]
    return total


@torch.no_grad()
def _greedy(model: nn.Module, context: list[int], max_new: int) -> Tensor:
    device = next(model.parameters()).device
    return model.generate(torch.tensor([context], device=device), max_new, compile=False)[0].cpu()


def _adapter(model: nn.Module, tokenizer: Any, max_length: int) -> Any:
    try:
        from lm_eval.api.model import LM
    except ImportError as e:
        raise ImportError(_HINT) from e

    class HybridLMAdapter(LM):
        def __init__(self):
            super().__init__()
            self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

        def _ids(self, text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        def loglikelihood(self, requests):
            out = []
            for req in requests:
                context, continuation = req.args
                ctx = [self.bos, *self._ids(context)]
                cont = self._ids(continuation)
                ctx = ctx[-(max_length - len(cont)) :]
                out.append(loglikelihood(model, ctx, cont))
            return out

        def loglikelihood_rolling(self, requests):
            return [(_rolling(model, self._ids(req.args[0]), self.bos, max_length),) for req in requests]

        def generate_until(self, requests):
            out = []
            for req in requests:
                context, kwargs = req.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else until
                new = _greedy(model, [self.bos, *self._ids(context)][-max_length:], kwargs.get("max_gen_toks", 256))
                text = tokenizer.decode(new.tolist())
                for stop in until:
                    text = text.split(stop)[0]
                out.append(text)
            return out

    return HybridLMAdapter()


def run_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    max_length: int = 4096,
) -> dict:
    """Score ``model`` on lm-evaluation-harness ``tasks`` (e.g. ["lambada_openai", "hellaswag"]); returns
    the harness's results dict. ``tokenizer``: a Hugging Face tokenizer or its name (loaded with
    transformers.AutoTokenizer). Needs ``pip install lm-eval``; raises ImportError with that hint otherwise."""
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError(_HINT) from e
    if isinstance(tokenizer, str):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError("run_lm_eval: a tokenizer name needs transformers: pip install transformers") from e
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    was_training = model.training
    model.eval()
    try:
        return lm_eval.simple_evaluate(
            model=_adapter(model, tokenizer, max_length), tasks=list(tasks), num_fewshot=num_fewshot, limit=limit
        )
    finally:
        model.train(was_training)
