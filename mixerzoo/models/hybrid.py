"""Hybrid stacks of token mixers from a pattern, and a small language model with prefill + compiled decode."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..mixers.base import State, TokenMixer
from .blocks import Block, RMSNorm

__all__ = ["HybridLM", "HybridStack", "sample_next"]


class HybridStack(nn.Module):
    """Pre-norm residual blocks (RMSNorm, mixer, RMSNorm, SwiGLU MLP), one per mixer, in order.

    forward(x, states=None, *, attention_mask=None) -> (y, states)
        x, y:           [B, T, D]
        states:         None (parallel form; returns None) or the list made by ``init_state``, one
                        State per layer, updated in place and returned.
        attention_mask: [B, T] bool or 0/1, left padding only.
    """

    def __init__(self, mixers: Sequence[TokenMixer], *, mlp_ratio: float = 4.0, pattern: str | None = None):
        super().__init__()
        mixers = list(mixers)
        if not mixers:
            raise ValueError("HybridStack: needs at least one mixer")
        for i, m in enumerate(mixers):
            if not isinstance(m, TokenMixer):
                raise TypeError(f"HybridStack: layer {i} is a {type(m).__name__}, not a TokenMixer")
        sizes = {m.config.hidden_size for m in mixers}
        if len(sizes) != 1:
            raise ValueError(f"HybridStack: every mixer must have the same hidden_size, got {sorted(sizes)}")
        self.hidden_size = sizes.pop()
        self.mlp_ratio = mlp_ratio
        self.pattern = pattern
        self.layers = nn.ModuleList(Block(m, mlp_ratio=mlp_ratio) for m in mixers)

    @classmethod
    def from_pattern(
        cls,
        pattern: str,
        *,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        **defaults: Any,
    ) -> HybridStack:
        """Build the stack that ``pattern`` (SPEC 3 grammar) describes.

        ``hidden_size`` and ``num_heads`` go to every mixer. Each stack-wide default goes to every layer
        whose mixer config has that field; a default that no layer takes raises TypeError. Per-layer
        overrides in brackets win over the defaults.
        """
        from .. import registry

        specs = registry.parse_pattern(pattern)
        resolved = []
        for i, layer in enumerate(specs):
            try:
                resolved.append(registry.spec(layer.name))
            except KeyError as e:
                raise KeyError(f"pattern layer {i}: {e.args[0]}") from None
        taken = {k for s in resolved for k in s.fields() if k in defaults}
        unused = [k for k in defaults if k not in taken]
        if unused:
            present = ", ".join(sorted({s.name for s in resolved}))
            raise TypeError(
                f"build_stack: default(s) {', '.join(repr(k) for k in unused)} taken by no layer's mixer "
                f"(the stack has {present})"
            )
        mixers = []
        for i, (layer, s) in enumerate(zip(specs, resolved, strict=True)):
            kwargs = {k: v for k, v in defaults.items() if k in s.fields()}
            kwargs.update(hidden_size=hidden_size, num_heads=num_heads)
            kwargs.update(layer.overrides)
            try:
                mixers.append(s.cls(s.make_config(**kwargs)))
            except (TypeError, ValueError) as e:
                kind = TypeError if isinstance(e, TypeError) else ValueError
                raise kind(f"pattern layer {i} ({layer.name}): {e}") from e
        return cls(mixers, mlp_ratio=mlp_ratio, pattern=pattern)

    @property
    def mixers(self) -> list[TokenMixer]:
        return [block.mixer for block in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    def init_state(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_seqlen: int | None = None,
    ) -> list[State]:
        """One fresh State per layer (a list, which is a pytree). ``device``/``dtype`` default to the
        parameters'; ``max_seqlen`` is required when a layer's state grows with the sequence."""
        p = next(iter(self.parameters()))
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        if max_seqlen is None:
            for i, m in enumerate(self.mixers):
                if m.state_growth == "linear":
                    raise ValueError(
                        f"HybridStack.init_state: layer {i} ({m.name}) keeps a cache that grows with the "
                        "sequence; pass max_seqlen (prompt length + new tokens)"
                    )
        return [m.init_state(batch_size, device=device, dtype=dtype, max_seqlen=max_seqlen) for m in self.mixers]

    def forward(
        self, x: Tensor, states: list[State] | None = None, *, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, list[State] | None]:
        if states is None:
            for block in self.layers:
                x, _ = block(x, None, attention_mask=attention_mask)
            return x, None
        if not isinstance(states, (list, tuple)) or len(states) != len(self.layers):
            got = len(states) if isinstance(states, (list, tuple)) else type(states).__name__
            raise ValueError(
                f"HybridStack: states must be the list of {len(self.layers)} states from init_state, got {got}"
            )
        out = []
        for block, state in zip(self.layers, states, strict=True):
            x, state = block(x, state, attention_mask=attention_mask)
            out.append(state)
        return x, out

    def extra_repr(self) -> str:
        return f"pattern={self.pattern!r}, hidden_size={self.hidden_size}, mlp_ratio={self.mlp_ratio}"


def sample_next(
    logits: Tensor, *, temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """The next token per row: greedy (``temperature=0``) or sampled from ``softmax(logits / temperature)``
    restricted to the ``top_k`` most likely tokens.

    logits: [B, V] -> [B] int64
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class HybridLM(nn.Module):
    """A language model around a HybridStack: token embedding, the stack, a final RMSNorm, and an output
    head tied to the embedding.

        lm = HybridLM(256, "(gdn swa)*2", hidden_size=128, num_heads=4, window_size=32)
        ids = lm.generate(prompt, max_new_tokens=32)

    forward(input_ids, states=None, *, attention_mask=None) -> (logits, states)
        input_ids:      [B, T] int64
        logits:         [B, T, V] in the parameters' dtype
        states, attention_mask: as for HybridStack.
    """

    def __init__(
        self,
        vocab_size: int,
        stack: HybridStack | str,
        *,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        **defaults: Any,
    ):
        super().__init__()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"HybridLM: vocab_size must be an int >= 1, got {vocab_size!r}")
        if isinstance(stack, str):
            if hidden_size is None or num_heads is None:
                raise TypeError("HybridLM: building from a pattern needs hidden_size= and num_heads=")
            stack = HybridStack.from_pattern(
                stack, hidden_size=hidden_size, num_heads=num_heads, mlp_ratio=mlp_ratio, **defaults
            )
        elif isinstance(stack, HybridStack):
            extra = [k for k, v in (("hidden_size", hidden_size), ("num_heads", num_heads)) if v is not None]
            extra += list(defaults)
            if extra:
                raise TypeError(f"HybridLM: {', '.join(extra)} only apply when building from a pattern string")
        else:
            raise TypeError(f"HybridLM: stack must be a HybridStack or a pattern str, got {type(stack).__name__}")
        self.vocab_size = vocab_size
        self.hidden_size = stack.hidden_size
        self.embed = nn.Embedding(vocab_size, self.hidden_size)
        # Unit-norm embeddings: inputs and tied-head logits both O(1) at init.
        nn.init.normal_(self.embed.weight, std=self.hidden_size**-0.5)
        self.stack = stack
        self.norm = RMSNorm(self.hidden_size, eps=1e-6)
        self._steps: dict[Any, Callable[[Tensor, list[State]], Tensor]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Compiled steps are bound to this instance: a copy or unpickled model compiles its own.
        state = self.__dict__.copy()
        state["_steps"] = {}
        return state

    def init_state(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_seqlen: int | None = None,
    ) -> list[State]:
        """See HybridStack.init_state."""
        return self.stack.init_state(batch_size, device=device, dtype=dtype, max_seqlen=max_seqlen)

    def forward(
        self, input_ids: Tensor, states: list[State] | None = None, *, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, list[State] | None]:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"HybridLM: input_ids must be [B, T], got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"HybridLM: input_ids must be integer token ids, got {input_ids.dtype}")
        h, states = self.stack(self.embed(input_ids), states, attention_mask=attention_mask)
        logits = F.linear(self.norm(h), self.embed.weight)  # [B, T, D] @ [V, D]^T -> [B, T, V]
        return logits, states

    # -- generation ------------------------------------------------------------------------------
    def _decode_step(self, token_ids: Tensor, states: list[State]) -> Tensor:
        logits, _ = self(token_ids, states)
        return logits[:, -1]

    def decode_step(self, compile: bool | str | Callable = True) -> Callable[[Tensor, list[State]], Tensor]:
        """The one-token decode step ``step(token_ids [B, 1], states) -> logits [B, V]`` (states advance
        in place).

        ``compile``: False for eager; True for ``torch.compile(fullgraph=True)`` with Inductor; a backend
        name or callable for another torch.compile backend (on a small CPU, Inductor's C++ compile can
        take minutes: ``"aot_eager"`` compiles in seconds). The compiled step is made once per model
        and backend and reused; positions live in tensors inside the states, so it does not recompile
        as the sequence grows (a new batch size or ``max_seqlen`` compiles one more graph).
        """
        if compile is False:
            return self._decode_step
        backend = "inductor" if compile is True else compile
        step = self._steps.get(backend)
        if step is None:
            # dynamic=False: another batch size or cache capacity gets its own static graph.
            step = torch.compile(self._decode_step, fullgraph=True, dynamic=False, backend=backend)
            self._steps[backend] = step
        return step

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        attention_mask: Tensor | None = None,
        compile: bool | str | Callable = True,
        max_seqlen: int | None = None,
        generator: torch.Generator | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Tensor:
        """Continue ``input_ids`` by ``max_new_tokens`` tokens: prefill the prompt in one forward, then
        decode one token at a time with the (compiled, see ``decode_step``) step.

        input_ids:      [B, T] int64 prompt; with ``attention_mask`` [B, T], rows may be left-padded.
        temperature:    0 for greedy decoding, else sample from softmax(logits / temperature),
                        restricted to the ``top_k`` most likely tokens when top_k is given.
        max_seqlen:     capacity of growing caches; defaults to T + max_new_tokens.
        progress:       called with the number of new tokens done after each token.
        returns:        [B, max_new_tokens] int64, the new tokens.

        Runs in eval mode (the training-mode semantics of some mixers are not for decoding); the model's
        mode is restored afterwards.
        """
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError("generate: input_ids must be a [B, T] tensor of token ids")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and temperature >= 0):
            raise ValueError(f"generate: temperature must be a number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"generate: top_k must be None or an int >= 1, got {top_k!r}")
        B, T = input_ids.shape
        need = T + max_new_tokens
        if max_seqlen is None:
            max_seqlen = need
        elif max_seqlen < need - 1:
            raise ValueError(
                f"generate: max_seqlen={max_seqlen} is below prompt length {T} + max_new_tokens "
                f"{max_new_tokens} - 1 (the last token is never fed back)"
            )
        was_training = self.training
        self.eval()
        try:
            states = self.init_state(B, device=input_ids.device, max_seqlen=max_seqlen)
            logits, states = self(input_ids, states, attention_mask=attention_mask)
            token = sample_next(logits[:, -1], temperature=temperature, top_k=top_k, generator=generator)
            out = input_ids.new_empty(B, max_new_tokens)
            out[:, 0] = token
            if progress is not None:
                progress(1)
            step = self.decode_step(compile) if max_new_tokens > 1 else None
            for i in range(1, max_new_tokens):
                logits = step(token[:, None], states)
                token = sample_next(logits, temperature=temperature, top_k=top_k, generator=generator)
                out[:, i] = token
                if progress is not None:
                    progress(i + 1)
            return out
        finally:
            self.train(was_training)
