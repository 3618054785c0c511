"""Hybrid stacks of token mixers from a pattern, and a small language model with prefill + compiled decode."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import registry
from ..mixers.base import State, TokenMixer
from . import state_files
from .blocks import Block, RMSNorm
from .config import HybridLMConfig
from .generation import GenerateStats, sample_next
from .generation import generate as _generate

__all__ = ["GenerateStats", "HybridLM", "HybridStack", "build_stack", "sample_next"]


def build_stack(
    pattern: str, *, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, **defaults: Any
) -> HybridStack:
    """A HybridStack of pre-norm residual blocks, one per layer of ``pattern`` (docs/patterns.md#grammar).

    ``hidden_size`` and ``num_heads`` go to every mixer. Each stack-wide default goes to every layer
    whose mixer config has that field; a default that no layer takes raises TypeError. Per-layer
    overrides in brackets win over the defaults.
    """
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
    return HybridStack(mixers, mlp_ratio=mlp_ratio, pattern=pattern)


class HybridStack(nn.Module):
    """Pre-norm residual blocks (RMSNorm, mixer, RMSNorm, SwiGLU MLP), one per mixer, in order.

    forward(x, states=None, *, attention_mask=None) -> (y, states)
        x, y:           [B, T, D]
        states:         None (parallel form; returns None) or the list made by ``init_state``, one
                        State per layer, updated in place and returned.
        attention_mask: [B, T] bool or 0/1 (False/0 marks padding): left padding, right padding or both,
                        one contiguous run of real tokens per row (docs/interface.md#forward).
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
        """Build the stack that ``pattern`` describes: see ``build_stack``."""
        return build_stack(pattern, hidden_size=hidden_size, num_heads=num_heads, mlp_ratio=mlp_ratio, **defaults)

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

    # -- state files -----------------------------------------------------------------------------
    def save_state(self, path: str | os.PathLike, states: Sequence[State]) -> None:
        """Write ``states`` (one State per layer, from ``init_state``) to one safetensors file: tensors
        ``layers.{i}.{field}``, and in the metadata each layer's mixer name, config and State class, the
        pattern and the library version (format: mixerzoo.models.state_files)."""
        state_files.save_states(self, path, states)

    def load_state(self, path: str | os.PathLike, *, device: torch.device | str | None = None) -> list[State]:
        """The states of a file written by ``save_state``, on ``device`` (default: the parameters').

        Raises ValueError naming the first mismatch (layer index, mixer name or config field, the file's
        value and this stack's) for a file saved from another stack, and for a damaged or edited file;
        every state is validated by ``State.from_dict`` and its shapes against its mixer's config.
        """
        return state_files.load_states(self, path, device=device)

    def extra_repr(self) -> str:
        return f"pattern={self.pattern!r}, hidden_size={self.hidden_size}, mlp_ratio={self.mlp_ratio}"


class HybridLM(nn.Module):
    """A language model around a HybridStack: token embedding, the stack, a final RMSNorm, and an output
    head (tied to the embedding unless ``tie_embeddings=False``).

        lm = HybridLM.from_config(HybridLMConfig.from_preset("tiny"))
        lm = HybridLM(256, "(gdn swa)*2", hidden_size=128, num_heads=4, window_size=32)   # or by keywords
        ids = lm.generate(prompt, max_new_tokens=32)

    forward(input_ids, states=None, *, attention_mask=None) -> (logits, states)
        input_ids:      [B, T] int64
        logits:         [B, T, V] in the parameters' dtype
        states, attention_mask: as for HybridStack.

    ``lm.config`` is the HybridLMConfig the model was built from (None when it was given a HybridStack).
    """

    def __init__(
        self,
        vocab_size: int,
        stack: HybridStack | str,
        *,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        tie_embeddings: bool = True,
        **defaults: Any,
    ):
        super().__init__()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"HybridLM: vocab_size must be an int >= 1, got {vocab_size!r}")
        if not isinstance(tie_embeddings, bool):
            raise ValueError(f"HybridLM: tie_embeddings must be a bool, got {tie_embeddings!r}")
        self.config: HybridLMConfig | None = None
        if isinstance(stack, str):
            if hidden_size is None or num_heads is None:
                raise TypeError("HybridLM: building from a pattern needs hidden_size= and num_heads=")
            stack = build_stack(stack, hidden_size=hidden_size, num_heads=num_heads, mlp_ratio=mlp_ratio, **defaults)
            self.config = HybridLMConfig(
                stack.pattern,
                vocab_size=vocab_size,
                hidden_size=hidden_size,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                mixer_defaults=defaults,
                tie_embeddings=tie_embeddings,
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
        self.tie_embeddings = tie_embeddings
        self.embed = nn.Embedding(vocab_size, self.hidden_size)
        # Unit-norm embeddings: inputs and (tied-head) logits both O(1) at init.
        nn.init.normal_(self.embed.weight, std=self.hidden_size**-0.5)
        self.stack = stack
        self.norm = RMSNorm(self.hidden_size, eps=1e-6)
        self.lm_head = None
        if not tie_embeddings:
            self.lm_head = nn.Linear(self.hidden_size, vocab_size, bias=False)
            nn.init.normal_(self.lm_head.weight, std=self.hidden_size**-0.5)
        self._steps: dict[Any, Callable[[Tensor, list[State]], Tensor]] = {}

    @classmethod
    def from_config(cls, config: HybridLMConfig) -> HybridLM:
        """The model ``config`` describes (``HybridLMConfig.from_preset(name)`` gives named ones)."""
        if not isinstance(config, HybridLMConfig):
            raise TypeError(f"HybridLM.from_config: config must be a HybridLMConfig, got {type(config).__name__}")
        lm = cls(
            config.vocab_size,
            config.pattern,
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            tie_embeddings=config.tie_embeddings,
            **config.mixer_defaults,
        )
        if config.init == "paper":
            from .paper_init import init_paper_

            init_paper_(lm, std=config.initializer_range)
        lm.config = config  # keeps the init settings, which the keyword path does not take
        return lm

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

    def save_state(self, path: str | os.PathLike, states: Sequence[State]) -> None:
        """See HybridStack.save_state; the metadata also holds this model's config (``model_config``)."""
        config = None if self.config is None else self.config.to_dict()
        state_files.save_states(self.stack, path, states, model_config=config, owner="HybridLM")

    def load_state(self, path: str | os.PathLike, *, device: torch.device | str | None = None) -> list[State]:
        """See HybridStack.load_state."""
        return state_files.load_states(self.stack, path, device=device, owner="HybridLM")

    def forward(
        self, input_ids: Tensor, states: list[State] | None = None, *, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, list[State] | None]:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"HybridLM: input_ids must be [B, T], got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"HybridLM: input_ids must be integer token ids, got {input_ids.dtype}")
        h, states = self.stack(self.embed(input_ids), states, attention_mask=attention_mask)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(self.norm(h), head)  # [B, T, D] @ [V, D]^T -> [B, T, V]
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

    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        attention_mask: Tensor | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        cuda_graph: bool | None = None,
        compile: bool | str | Callable = True,
        max_seqlen: int | None = None,
        progress: Callable[[int], None] | None = None,
        return_stats: bool = False,
    ) -> Tensor | tuple[Tensor, GenerateStats]:
        """Continue ``input_ids`` by up to ``max_new_tokens`` tokens: prefill the prompt in one forward, then
        decode one token at a time with one step (``decode_step(compile)``), captured in a CUDA graph on CUDA.

        input_ids:      [B, T] int64 prompt.
        attention_mask: [B, T] bool or 0/1; batched prompts of different lengths are left-padded (every
                        row's last prompt token must be real).
        do_sample:      False (default): greedy, the argmax token. True: sample from
                        softmax(logits / temperature), restricted to the ``top_k`` most likely tokens and
                        then to the ``top_p`` nucleus when given (``temperature=0`` is greedy as well).
                        The sampling settings, seed and generator are refused with do_sample=False.
        seed, generator: the sampling randomness (one of them): a seed makes a fresh generator on the
                        input's device, so that a seeded call is reproducible.
        eos_token_id:   an id or a list of ids; a row that emits one has ended, and its later columns
                        hold ``pad_token_id`` (default: the first eos id). Generation stops early when
                        every row has ended; the result keeps its [B, max_new_tokens] shape.
        cuda_graph:     capture the decode step in a torch.cuda.CUDAGraph (static token and logits
                        buffers; the states are updated in place at fixed addresses, so one capture
                        replays for every position). None (default): on CUDA inputs only. True on the
                        CPU is an error.
        compile:        as for ``decode_step``: True (Inductor), a backend name or callable, or False
                        (eager). With cuda_graph the compiled step is warmed up, then captured.
        max_seqlen:     capacity of growing caches; defaults to T + max_new_tokens.
        progress:       called with the number of new tokens done after each token.
        return_stats:   also return a GenerateStats (prefill and decode tokens/s, setup time); the
                        result is then ``(tokens, stats)``.
        returns:        [B, max_new_tokens] int64, the new tokens (without the prompt).

        Runs in eval mode under torch.no_grad() (the training-mode semantics of some mixers are not for
        decoding); the model's mode is restored afterwards.
        """
        return _generate(
            self,
            input_ids,
            max_new_tokens,
            attention_mask=attention_mask,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            seed=seed,
            generator=generator,
            cuda_graph=cuda_graph,
            compile=compile,
            max_seqlen=max_seqlen,
            progress=progress,
            return_stats=return_stats,
        )
