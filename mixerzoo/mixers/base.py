"""The interface every token mixer shares: a frozen config, the decode-state protocol, input checks."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

__all__ = [
    "FLOAT_DTYPES",
    "acc_dtype",
    "MixerConfig",
    "State",
    "TokenMixer",
    "positions_and_pad",
    "state_dataclass",
    "state_field",
]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """Fields every mixer takes. Subclasses add their own, each with a default.

    ``head_dim`` defaults to ``hidden_size // num_heads``; ``num_kv_heads`` (where a mixer has it)
    defaults to ``num_heads``.
    """

    mixer_name: ClassVar[str] = "mixer"  # set by @register

    hidden_size: int
    num_heads: int

    def __post_init__(self) -> None:
        self.check_int("hidden_size", minimum=1)
        self.check_int("num_heads", minimum=1)

    # -- validation helpers, used by every config's __post_init__ ------------------------------
    def fail(self, field: str, value: Any, allowed: str) -> None:
        raise ValueError(f"{self.mixer_name}: {field} must be {allowed}, got {value!r}")

    def check_int(self, field: str, *, minimum: int | None = None, allow_none: bool = False) -> None:
        value = getattr(self, field)
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, value, "an int" + (" or None" if allow_none else ""))
        if minimum is not None and value < minimum:
            self.fail(field, value, f">= {minimum}")

    def check_choice(self, field: str, choices: tuple) -> None:
        value = getattr(self, field)
        if value not in choices:
            self.fail(field, value, "one of " + ", ".join(repr(c) for c in choices))

    def check_float(self, field: str, *, low: float | None = None, high: float | None = None) -> None:
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(field, value, "a number")
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(field, value, f"in [{low}, {high}]")

    def check_heads(self, *, head_dim: int | None, num_kv_heads: int | None = None) -> None:
        """Check head_dim (None: hidden_size // num_heads) and GQA grouping."""
        if head_dim is None and self.hidden_size % self.num_heads:
            self.fail(
                "hidden_size",
                self.hidden_size,
                f"a multiple of num_heads={self.num_heads} (or pass head_dim)",
            )
        if num_kv_heads is not None and self.num_heads % num_kv_heads:
            self.fail("num_kv_heads", num_kv_heads, f"a divisor of num_heads={self.num_heads}")


# --------------------------------------------------------------------------------------------------
# States
# --------------------------------------------------------------------------------------------------


def state_field(*, batched: bool = True, fill: float = 0.0) -> Any:
    """A State field. ``batched``: dim 0 is the batch (``select`` indexes it); ``fill``: value after reset_."""
    return dataclasses.field(metadata={"batched": batched, "fill": fill})


def state_dataclass(cls: type) -> type:
    """Make ``cls`` (a State subclass) a dataclass and register it as a pytree, so compiled functions
    take and return it."""
    return _register_pytree(dataclasses.dataclass(eq=False)(cls))


def _register_pytree(cls: type) -> type:
    names = [f.name for f in dataclasses.fields(cls)]

    def flatten(s):
        return [getattr(s, n) for n in names], None

    def unflatten(values, _context):
        return cls(*values)

    def flatten_with_keys(s):
        return [(pytree.GetAttrKey(n), getattr(s, n)) for n in names], None

    pytree.register_pytree_node(
        cls,
        flatten,
        unflatten,
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=flatten_with_keys,
    )
    return cls


@dataclasses.dataclass(eq=False)
class State:
    """Base of every mixer's decode state: a dataclass of fixed-shape tensors, updated in place.

    Every state carries two counters:
      seen: [] int64, tokens consumed so far (left padding included); the slot of the next token.
      pad:  [B] int64, left-padding tokens per row; a token's position is ``slot - pad``.
    """

    seen: Tensor = state_field(batched=False)
    pad: Tensor = state_field()

    # -- introspection ---------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def batch_size(self) -> int:
        return self.pad.shape[0]

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Tensor]:
        """Contiguous copies of every tensor, keyed by field name (``safetensors.torch.save_file`` ready)."""
        return {k: v.detach().contiguous().clone() for k, v in self.tensors().items()}

    @classmethod
    def from_dict(cls, tensors: dict[str, Tensor]) -> State:
        names = [f.name for f in dataclasses.fields(cls)]
        missing = sorted(set(names) - set(tensors))
        extra = sorted(set(tensors) - set(names))
        if missing or extra:
            raise ValueError(f"{cls.__name__}.from_dict: fields do not match; missing {missing}, unexpected {extra}")
        return cls(**{n: tensors[n] for n in names})

    # -- batch surgery ---------------------------------------------------------------------------
    def select(self, batch_idx: Tensor | list[int]) -> State:
        """A new state holding rows ``batch_idx`` (reorder, repeat or prune a batch, as beam search does)."""
        idx = torch.as_tensor(batch_idx, dtype=torch.long, device=self.pad.device)
        values = {
            f.name: getattr(self, f.name)[idx].clone()
            if f.metadata.get("batched", True)
            else getattr(self, f.name).clone()
            for f in dataclasses.fields(self)
        }
        return type(self)(**values)

    @torch.no_grad()
    def reset_(self) -> State:
        """Return to the empty sequence, in place (addresses are kept for CUDA graphs)."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).fill_(f.metadata.get("fill", 0.0))
        return self

    @torch.no_grad()
    def copy_(self, other: State) -> State:
        """Overwrite this state's tensors with ``other``'s, in place."""
        for name, t in self.tensors().items():
            t.copy_(getattr(other, name))
        return self


_register_pytree(State)


# --------------------------------------------------------------------------------------------------
# Mixers
# --------------------------------------------------------------------------------------------------


class TokenMixer(nn.Module):
    """Base of every mixer. Subclasses implement ``mix`` and ``init_state``; ``forward`` checks inputs.

    forward(x, state=None, *, attention_mask=None) -> (y, state)
        x:              [B, T, D]
        state:          None for the parallel form (returns (y, None)); else the mixer's State, which
                        x continues: it is updated in place and returned.
        attention_mask: [B, T] bool or 0/1, left padding only (False/0 marks padding).
        y:              [B, T, D]
    """

    # Capabilities, read by @register into the registry spec; they drive the conformance checks.
    state_growth: ClassVar[str] = "constant"  # "constant" or "linear"
    state_class: ClassVar[type[State]] = State
    supports_decode: ClassVar[bool] = True
    supports_padding: ClassVar[bool] = True
    supports_gqa: ClassVar[bool] = False
    dtypes: ClassVar[tuple[torch.dtype, ...]] = FLOAT_DTYPES
    compile_safe: ClassVar[bool] = True
    backends: ClassVar[tuple[str, ...]] = ()
    # Small settings under which the mixer's behaviour shows at T ~ 40 (e.g. a window of 8).
    conformance_kwargs: ClassVar[dict[str, Any]] = {}
    # Sequence length of the conformance checks (long enough for the settings above to matter).
    conformance_seqlen: ClassVar[int] = 37
    # Whether train and eval compute different functions (conformance compares eval decode only).
    train_differs: ClassVar[bool] = False

    config: MixerConfig

    def __init__(self, config: MixerConfig):
        super().__init__()
        self.config = config
        # (batch size, capacity) -> field shapes of this config's state; filled by _check_state_shapes
        self._state_shapes: dict[tuple[int, int | None], dict[str, tuple[int, ...]]] = {}

    @property
    def name(self) -> str:
        return type(self.config).mixer_name

    # -- to implement ----------------------------------------------------------------------------
    def mix(self, x: Tensor, state: State | None, attention_mask: Tensor | None) -> tuple[Tensor, State | None]:
        raise NotImplementedError

    def init_state(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_seqlen: int | None = None,
    ) -> State:
        raise NotImplementedError

    # -- the shared entry point ------------------------------------------------------------------
    def forward(
        self, x: Tensor, state: State | None = None, *, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, State | None]:
        self.check_inputs(x, state, attention_mask)
        return self.mix(x, state, attention_mask)

    def _param_like(self) -> Tensor | None:
        return next(iter(self.parameters()), None)

    def check_inputs(self, x: Tensor, state: State | None, attention_mask: Tensor | None) -> None:
        """Raise a clear error for input this mixer cannot take. Shape checks only: no device sync."""
        name = self.name
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: x must be a torch.Tensor [B, T, D], got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name}: x must have shape [B, T, D] (rank 3), got rank {x.dim()} {tuple(x.shape)}")
        B, T, D = x.shape
        if D != self.config.hidden_size:
            raise ValueError(
                f"{name}: x has hidden size {D} (last dim), expected hidden_size={self.config.hidden_size}"
            )
        if T == 0:
            raise ValueError(f"{name}: x has no tokens (T = 0)")
        if x.dtype not in self.dtypes and not (x.dtype == torch.float64 and x.device.type == "cpu"):
            allowed = ", ".join(str(d) for d in self.dtypes) + " (float64 on the CPU)"
            raise TypeError(f"{name}: x has dtype {x.dtype}, allowed: {allowed}")
        p = self._param_like()
        if p is not None:
            if x.dtype != p.dtype:
                raise TypeError(
                    f"{name}: x has dtype {x.dtype} but the mixer's parameters are {p.dtype}; "
                    f"cast one of them (e.g. mixer.to({x.dtype}))"
                )
            if x.device != p.device:
                raise ValueError(
                    f"{name}: x is on {x.device} but the mixer's parameters are on {p.device}; "
                    f"move one of them (e.g. x.to('{p.device}'))"
                )
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (B, T):
                shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask)
                raise ValueError(f"{name}: attention_mask must have shape [B, T] = {(B, T)}, got {shape}")
            if attention_mask.device != x.device:
                raise ValueError(f"{name}: attention_mask is on {attention_mask.device}, x on {x.device}")
            if not self.supports_padding:
                raise ValueError(f"{name}: this mixer does not take an attention_mask (no padding support)")
        if state is not None:
            if not self.supports_decode:
                raise ValueError(f"{name}: this mixer has no decode state; call it with state=None")
            if type(state) is not self.state_class:
                raise TypeError(
                    f"{name}: state must be a {self.state_class.__name__} made by this mixer's init_state, "
                    f"got {type(state).__name__}"
                )
            if state.batch_size != B:
                raise ValueError(f"{name}: state was made for batch size {state.batch_size}, x has batch size {B}")
            if state.pad.device != x.device:
                raise ValueError(f"{name}: state is on {state.pad.device}, x is on {x.device}")
            if not torch.compiler.is_compiling():
                self._check_state_shapes(state)

    def _check_state_shapes(self, state: State) -> None:
        """A state from a mixer of the same kind but another config has other shapes: refuse it."""
        key = (state.batch_size, self._state_capacity(state))
        want = self._state_shapes.get(key)
        if want is None:  # the config is frozen, so the shapes depend on the key only: built once per key
            made = self.init_state(key[0], device="meta", max_seqlen=key[1])
            want = self._state_shapes[key] = {k: tuple(t.shape) for k, t in made.tensors().items()}
        for k, t in state.tensors().items():
            if tuple(t.shape) != want[k]:
                raise ValueError(
                    f"{self.name}: state field '{k}' has shape {tuple(t.shape)}, this mixer's config needs "
                    f"{want[k]}: the state was made by a mixer with another config"
                )

    def _state_capacity(self, state: State) -> int | None:
        """max_seqlen a linear-growth state was made with (None for constant-size states)."""
        return None

    def extra_repr(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return f"{self.name}: {fields}"


# --------------------------------------------------------------------------------------------------
# Helpers shared by the mixers
# --------------------------------------------------------------------------------------------------


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def positions_and_pad(x: Tensor, state: State | None, attention_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Slots, positions and validity of the tokens of x.

    Returns
      slot:  [T] int64, index of each token in the stream (left padding included)
      pos:   [B, T] int64, absolute position of each token (slot minus the row's left padding)
      valid: [B, T] bool, False for padding
    A mask given at prefill sets ``state.pad`` (in place) so that decode steps keep the positions.
    """
    B, T, _ = x.shape
    start = state.seen if state is not None else torch.zeros((), dtype=torch.long, device=x.device)
    slot = start + torch.arange(T, device=x.device)
    if attention_mask is not None:
        valid = attention_mask.bool()
        new_pad = (~valid).sum(-1)
        pad = new_pad if state is None else state.pad + new_pad
        if state is not None:
            state.pad.copy_(pad)
    else:
        valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
        pad = state.pad if state is not None else torch.zeros(B, dtype=torch.long, device=x.device)
    pos = slot[None, :] - pad[:, None]
    return slot, pos, valid
