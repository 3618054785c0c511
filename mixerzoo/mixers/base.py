"""The interface every token mixer shares: a frozen config, the decode-state protocol, input checks."""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ..kernels import state_fill
from ..kernels._checks import check_values

__all__ = [
    "ENDED",
    "FLOAT_DTYPES",
    "MixerConfig",
    "State",
    "TokenMixer",
    "acc_dtype",
    "check_row_open",
    "leading_padding",
    "live_pad",
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

    hidden_size: model width D, the last dim of x.
    num_heads:   attention or state heads (required by mixers with heads; a mixer without heads may
                 leave it None). ``head_dim`` defaults to ``hidden_size // num_heads``; ``num_kv_heads``
                 (where a mixer has it) to ``num_heads``.
    """

    mixer_name: ClassVar[str] = "mixer"  # set by @register

    hidden_size: int
    num_heads: int | None = None

    def __post_init__(self) -> None:
        self.check_int("hidden_size", minimum=1)
        self.check_int("num_heads", minimum=1, allow_none=True)

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
        if not math.isfinite(value):
            self.fail(field, value, "a finite number")
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(field, value, f"in [{low}, {high}]")

    def check_heads(self, *, head_dim: int | None, num_kv_heads: int | None = None) -> None:
        """Check num_heads (required here), head_dim (None: hidden_size // num_heads) and GQA grouping."""
        if self.num_heads is None:
            self.fail("num_heads", None, "an int >= 1 (this mixer has heads)")
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
    return _register_pytree(dataclasses.dataclass(eq=False, repr=False)(cls))


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


# A row whose padding came after real tokens (right padding) has ended: ``pad`` gets this added, so that
# every later token has a negative position (padding to every mixer) and a real one is refused as a hole.
ENDED = 2**40


@dataclasses.dataclass(eq=False, repr=False)
class State:
    """Base of every mixer's decode state: a dataclass of fixed-shape tensors, updated in place.

    Every state carries two counters:
      seen: [] int64, tokens consumed so far (padding included); the slot of the next token.
      pad:  [B] int64, leading padding tokens per row; a token's position is ``slot - pad``. A row that
            ended with right padding has ``ENDED`` (2**40) added: later tokens are all padding.
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

    def __repr__(self) -> str:
        seen = "?" if self.seen.device.type == "meta" else int(self.seen)
        fields = ", ".join(
            f"{k}=[{', '.join(map(str, t.shape))}] {str(t.dtype).removeprefix('torch.')}"
            for k, t in self.tensors().items()
            if k not in ("seen", "pad")
        )
        return (
            f"{type(self).__name__}(batch_size={self.batch_size}, seen={seen}, {fields}, "
            f"device={self.pad.device}, nbytes={self.nbytes()})"
        )

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Tensor]:
        """Contiguous copies of every tensor, keyed by field name (``safetensors.torch.save_file`` ready)."""
        return {k: v.detach().contiguous().clone() for k, v in self.tensors().items()}

    @classmethod
    def from_dict(cls, tensors: dict[str, Tensor]) -> State:
        """The state of ``to_dict`` (e.g. loaded with ``safetensors.torch.load_file``), validated: field
        names, tensor types, batch sizes, counter dtypes and ranges, finite floating fields. Shapes and
        dtypes against a mixer's config are checked when the state is passed to the mixer."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = sorted(set(names) - set(tensors))
        extra = sorted(set(tensors) - set(names))
        if missing or extra:
            raise ValueError(f"{cls.__name__}.from_dict: fields do not match; missing {missing}, unexpected {extra}")
        state = cls(**{n: tensors[n] for n in names})
        state.validate()
        return state

    def validate(self) -> State:
        """Raise ValueError naming the field when the state cannot be one a mixer made; returns self."""
        where = type(self).__name__
        for k, t in self.tensors().items():
            if not isinstance(t, Tensor):
                raise ValueError(f"{where}: field '{k}' must be a torch.Tensor, got {type(t).__name__}")
        seen, pad = self.seen, self.pad
        if seen.dim() != 0 or seen.dtype != torch.long:
            raise ValueError(f"{where}: 'seen' must be a 0-dim int64 tensor, got {tuple(seen.shape)} {seen.dtype}")
        if pad.dim() != 1 or pad.dtype != torch.long:
            raise ValueError(f"{where}: 'pad' must be a [B] int64 tensor, got {tuple(pad.shape)} {pad.dtype}")
        B = pad.shape[0]
        for f in dataclasses.fields(self):
            t = getattr(self, f.name)
            if f.metadata.get("batched", True) and (t.dim() == 0 or t.shape[0] != B):
                raise ValueError(
                    f"{where}: field '{f.name}' has shape {tuple(t.shape)}; its first dim must be the batch size {B}"
                )
            if t.device != pad.device:
                raise ValueError(f"{where}: field '{f.name}' is on {t.device}, 'pad' on {pad.device}")
        if pad.device.type == "meta":
            return self
        n = int(seen)
        if n < 0:
            raise ValueError(f"{where}: 'seen' must be >= 0, got {n}")
        lead = torch.where(pad >= ENDED, pad - ENDED, pad)
        if bool(((lead < 0) | (lead > n)).any()):
            raise ValueError(f"{where}: 'pad' must be in [0, seen={n}] per row, got {pad.tolist()}")
        for k, t in self.tensors().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where}: field '{k}' holds NaN or Inf")
        return self

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
        attention_mask: [B, T] bool or 0/1 (False/0 marks padding): left padding, right padding or both,
                        one contiguous run of real tokens per row (holes raise ValueError). Padding is
                        invisible, never shifts positions, and gets output 0, whatever x holds there.
        y:              [B, T, D]

    A state update never records autograd history: gradients reach the inputs and parameters of the
    current call, never earlier calls through the state (a mixer that trains through its state says
    so with ``trains_through_state = True``).
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
    # Whether gradients flow through the state into earlier calls (none of the built-in mixers).
    trains_through_state: ClassVar[bool] = False
    # Config overrides under which the training gradient is the exact derivative of the forward (the
    # full float64 gradcheck runs with them), for mixers whose default gradient is a surrogate.
    exact_grad_kwargs: ClassVar[dict[str, Any]] = {}
    # Config overrides (at the conformance settings) under which the mixer makes no discrete choice, so that a
    # change of precision moves its outputs by rounding only: every token kept, every block selected. The
    # checks that compare runs at two precisions use them; a flipped choice there is no error.
    choice_free_kwargs: ClassVar[dict[str, Any]] = {}

    config: MixerConfig

    def __init__(self, config: MixerConfig):
        super().__init__()
        self.config = config
        # (batch size, capacity, dtype) -> field shapes and dtypes of this config's state; filled by
        # _check_state_shapes
        self._state_shapes: dict[tuple, tuple[tuple[str, torch.Size, torch.dtype], ...]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Every init_state, ours or a third party's, gets its arguments checked first.
        fn = cls.__dict__.get("init_state")
        if fn is not None and not getattr(fn, "_checked", False):

            @functools.wraps(fn)
            def init_state(self, batch_size, *, device=None, dtype=None, max_seqlen=None):
                self._check_init_args(batch_size, device, dtype, max_seqlen)
                return fn(self, batch_size, device=device, dtype=dtype, max_seqlen=max_seqlen)

            init_state._checked = True
            cls.init_state = init_state

    @property
    def name(self) -> str:
        return type(self.config).mixer_name

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half() ... give the parameters new tensors: forget the decode steps' packed projection
        # weights (step_projections), which would otherwise keep the old ones alive
        self.__dict__.pop("_step_packs", None)
        return super()._apply(fn, recurse)

    def _check_init_args(self, batch_size: Any, device: Any, dtype: Any, max_seqlen: Any) -> None:
        name = self.name
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{name}: init_state batch_size must be an int >= 1, got {batch_size!r}")
        if max_seqlen is not None and (
            isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1
        ):
            raise ValueError(f"{name}: init_state max_seqlen must be None or an int >= 1, got {max_seqlen!r}")
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"{name}: init_state device must be a torch.device or a string, got {device!r}") from e
        if dtype is not None:
            on_cpu = device is None or device.type in ("cpu", "meta")
            if not isinstance(dtype, torch.dtype) or not (dtype in self.dtypes or (dtype == torch.float64 and on_cpu)):
                allowed = ", ".join(str(d) for d in self.dtypes) + " (float64 on the CPU)"
                raise TypeError(f"{name}: init_state dtype must be one of {allowed}, got {dtype!r}")

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
        valid = None
        if attention_mask is not None:
            valid = self._mask(attention_mask)
            # Select, never multiply: NaN or Inf at a padding position must not reach anything.
            x = torch.where(valid[..., None], x, 0.0)
        y, state = self.mix(x, state, valid)
        if valid is not None:
            y = torch.where(valid[..., None], y, 0.0)
        if state is not None and not self.trains_through_state and torch.is_grad_enabled():
            for k, t in state.tensors().items():
                if t.requires_grad:
                    raise RuntimeError(
                        f"{self.name}: the update of state field '{k}' recorded autograd history; a state "
                        f"must be written with detached values (or the mixer must declare trains_through_state)"
                    )
        return y, state

    def _mask(self, attention_mask: Tensor) -> Tensor:
        """The mask as bool [B, T], checked: 0/1 values, one contiguous run of real tokens per row."""
        m = attention_mask
        if m.dtype != torch.bool:
            if m.is_complex():
                raise TypeError(f"{self.name}: attention_mask must be bool or 0/1, got dtype {m.dtype}")
            check_values(
                self.name, (m == 0) | (m == 1), "attention_mask must hold only 0 and 1 (or be bool)", sync=True
            )
            m = m != 0
        t = torch.arange(m.shape[1], device=m.device)
        n = m.sum(-1, keepdim=True)  # [B, 1] real tokens
        lead = leading_padding(m)[:, None]  # [B, 1]
        run = (t >= lead) & (t < lead + n)  # the contiguous run the mask must be
        check_values(
            self.name,
            run == m,
            "attention_mask has padding between real tokens; padding may only precede or follow them "
            "(left or right padding)",
            sync=True,
        )
        return m

    def _param_like(self) -> Tensor | None:
        """The first parameter, read where it was found last time (by submodule path, so a replaced submodule or
        parameter is seen); else found by a walk over the submodules (tens of microseconds: a decode step's
        check_inputs calls this every token)."""
        at = self.__dict__.get("_param_at")
        if at is not None:
            try:
                p = self.get_submodule(at[0])._parameters.get(at[1])
            except AttributeError:
                p = None
            if p is not None:
                return p
        for path, mod in self.named_modules():
            for name, p in mod._parameters.items():
                if p is not None:
                    self.__dict__["_param_at"] = (path, name)  # not a submodule or buffer: a plain attribute
                    return p
        return None

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
                self._check_state_shapes(state, x.dtype)

    def _check_state_shapes(self, state: State, dtype: torch.dtype) -> None:
        """A state from a mixer of the same kind but another config has other shapes, and one made for
        another dtype (or loaded from a file with other dtypes) has other dtypes: refuse it."""
        key = (state.batch_size, self._state_capacity(state), dtype)
        want = self._state_shapes.get(key)
        if want is None:  # the config is frozen, so the layout depends on the key only: built once per key
            made = self.init_state(key[0], device="meta", max_seqlen=key[1], dtype=dtype)
            want = self._state_shapes[key] = tuple((k, t.shape, t.dtype) for k, t in made.tensors().items())
        for k, shape, want_dtype in want:
            t = getattr(state, k)
            if t.shape == shape and t.dtype == want_dtype:
                continue
            if t.shape != shape:
                raise ValueError(
                    f"{self.name}: state field '{k}' has shape {tuple(t.shape)}, this mixer's config needs "
                    f"{tuple(shape)}: the state was made by a mixer with another config"
                )
            if t.dtype != want_dtype:
                raise TypeError(
                    f"{self.name}: state field '{k}' has dtype {t.dtype}, input of dtype {dtype} needs "
                    f"{want_dtype}: make the state with init_state(..., dtype={dtype})"
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


def step_projections(
    owner: nn.Module, key: str, linears: tuple[nn.Linear, ...], x: Tensor, dtype: torch.dtype
) -> Tensor:
    """x [B, D] through ``linears`` (one input size) as one matmul: [B, sum of their out_features] in ``dtype``,
    each linear's output at its columns, in order. For the eager decode steps (no autograd), where each matmul
    costs as much host time as the step's kernels.

    The first call packs the weights: one tensor holds them all, and each ``weight`` (and bias) becomes a view of
    its rows (``param.data``; the Parameter objects, their values and ``requires_grad`` stay, so optimizers,
    state dicts and training see no difference, and no memory is added). Later calls check, from the data
    pointers, that the weights are still those views, and pack again otherwise (after ``.to()``, a loaded state
    dict with ``assign=True``, a replaced parameter). Linears of another class (a wrapped or parametrized
    projection) or parameters of a tensor subclass are not packed: their outputs are concatenated instead."""
    if torch.compiler.is_compiling():  # traced (a compiled decode step): the plain matmuls, which Inductor may fuse
        return cast_all(dtype, torch.cat([m(x) for m in linears], -1))[0]
    return cast_all(dtype, _packed_matmul(owner, key, linears, x))[0]


def _packed_matmul(owner: nn.Module, key: str, linears: tuple[nn.Linear, ...], x: Tensor) -> Tensor:
    """step_projections' matmul in the linears' dtype: through the pack ``owner`` keeps under ``key`` while the
    parameters are still its views, else packing them again (or concatenating the linears' outputs where they
    cannot be packed)."""
    packs = owner.__dict__.get("_step_packs")
    rec = None if packs is None else packs.get(key)
    if rec is not None and _data_ptrs(linears, rec[1] is not None) == rec[2]:
        return F.linear(x, rec[0], rec[1])
    # never packed inside a CUDA-graph capture: the weights would move into the graph's private memory pool
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    rec = None if capturing else _pack_linears(linears)
    if rec is None:
        return torch.cat([m(x) for m in linears], -1)
    if packs is None:
        packs = owner.__dict__["_step_packs"] = {}  # a plain attribute: neither a buffer nor in state dicts
    packs[key] = rec
    return F.linear(x, rec[0], rec[1])


def _pack_linears(linears: tuple[nn.Linear, ...]) -> tuple[Tensor, Tensor | None, tuple[int, ...]] | None:
    """(weights, biases or None, data pointers of the parameters) after making the parameters views of them, or
    None when the linears cannot be packed (see step_projections)."""
    ws = [m.weight for m in linears]
    w0 = ws[0]
    if not all(
        type(m) is nn.Linear
        and m.weight.shape[1] == w0.shape[1]
        and all(type(p) is nn.Parameter and p.dtype == w0.dtype and p.device == w0.device
                for p in (m.weight, m.bias) if p is not None)
        for m in linears
    ):  # fmt: skip
        return None
    has_bias = any(m.bias is not None for m in linears)
    # normal tensors even under inference_mode: a parameter must stay usable for training afterwards
    with torch.no_grad(), torch.inference_mode(False):
        w = torch.cat([p.detach() for p in ws])
        b = None
        if has_bias:
            b = torch.cat([m.bias.detach() if m.bias is not None else w0.new_zeros(m.out_features) for m in linears])
        row = 0
        for m in linears:
            n = m.out_features
            m.weight.data = w[row : row + n]
            if m.bias is not None:
                m.bias.data = b[row : row + n]
            row += n
    return w, b, _data_ptrs(linears, b is not None)


def _data_ptrs(linears: tuple[nn.Linear, ...], biases: bool) -> tuple[int, ...]:
    # where each weight (and bias: 0 for None) lives now
    if not biases:
        return tuple(m.weight.data_ptr() for m in linears)
    return tuple(p.data_ptr() if p is not None else 0 for m in linears for p in (m.weight, m.bias))


def cast_all(dtype: torch.dtype, *tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` (one dtype) in ``dtype``; as given when they already are, without calling ``.to()``, whose no-op
    still costs microseconds of host time (a decode step's projections, every token)."""
    return tensors if tensors[0].dtype == dtype else tuple(t.to(dtype) for t in tensors)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def leading_padding(valid: Tensor) -> Tensor:
    """valid: [B, T] bool -> [B] int64, padding tokens before each row's first real token (T: none real)."""
    T = valid.shape[1]
    return torch.where(valid.any(-1), valid.int().argmax(-1), T).long()


def positions_and_pad(
    x: Tensor, state: State | None, attention_mask: Tensor | None, name: str = "mixer"
) -> tuple[Tensor, Tensor, Tensor]:
    """Slots, positions and validity of the tokens of x.

    Returns
      slot:  [T] int64, index of each token in the stream (padding included)
      pos:   [B, T] int64, absolute position of each real token: its slot minus the row's leading padding
             (padding tokens get positions too; callers hide them with ``valid``)
      valid: [B, T] bool, False for padding
    ``attention_mask`` is the checked bool mask of TokenMixer.forward (one run of real tokens per row).
    With a state, the mask continues the row: leading padding adds to ``state.pad`` (in place) while the
    row has no real token; padding after a real token ends the row (``ENDED`` is added to ``state.pad``),
    and a real token after that is a hole in the mask: ValueError.
    """
    B, T, _ = x.shape
    start = state.seen if state is not None else torch.zeros((), dtype=torch.long, device=x.device)
    slot = start + torch.arange(T, device=x.device)
    valid = attention_mask if attention_mask is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
    if state is None:
        lead = (
            leading_padding(valid) if attention_mask is not None else torch.zeros(B, dtype=torch.long, device=x.device)
        )
        return slot, slot[None, :] - lead[:, None], valid
    if attention_mask is None:
        check_row_open(name, state)
        return slot, slot[None, :] - state.pad[:, None], valid
    ended = state.pad >= ENDED  # [B]
    n = valid.sum(-1)  # [B] real tokens in the chunk
    lead = leading_padding(valid)  # [B]
    started = (start - state.pad) > 0  # the row has real tokens already
    hole = (n > 0) & (ended | (started & (lead > 0)))
    check_values(
        name, ~hole, "a real token follows padding that came after real tokens (a hole in the mask)", sync=True
    )
    pad = torch.where(ended | started, state.pad, state.pad + lead)
    ends = ~ended & ((n > 0) & (lead + n < T) | (n == 0) & started)
    state.pad.copy_(torch.where(ends, pad + ENDED, pad))
    return slot, slot[None, :] - pad[:, None], valid


# Pad counters whose rows were last checked open (_note / _noted, as _SEEN_HOST). Rows end only by an in-place
# change of ``pad`` (positions_and_pad's copy_, or a user's), which bumps the version: while it stands still, the
# rows are still open and a decode step need not check again (three operations per layer and step in an eager
# decode loop). A counter seen while capturing a CUDA graph, an inference tensor (no version counter), or anything
# while compiling is always checked.
_PAD_OPEN: dict[int, tuple[Any, int | None, bool]] = {}


def check_row_open(name: str, state: State) -> None:
    """The check a mask-less chunk needs (positions_and_pad, and the decode steps that skip it): no row of the
    state was ended by right padding, since a real token after that is a hole in the mask. Asynchronous on a GPU;
    skipped when ``state.pad`` has not changed since it last passed (see _PAD_OPEN)."""
    pad = state.pad
    msg = "a real token follows the right padding that ended its row (a hole in the mask)"
    if torch.compiler.is_compiling() or pad.is_inference():  # nothing host-side is traced (no guard on ids)
        check_values(name, pad < ENDED, msg)
        return
    capturing = pad.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and _noted(_PAD_OPEN, pad):
        return
    check_values(name, pad < ENDED, msg)
    _note(_PAD_OPEN, pad, None if capturing else pad._version, True)


def live_pad(state: State) -> Tensor:
    """``state.pad`` without the ENDED mark: [B] leading padding of each row."""
    return torch.where(state.pad >= ENDED, state.pad - ENDED, state.pad)


def whole_prompt(x: Tensor, state: State, attention_mask: Tensor | None) -> bool:
    """Whether a chunk is a whole prompt that a mixer may run as its parallel form and then fill the state from:
    several tokens, eager (not while torch.compile traces), a state that has seen nothing, and rows that may start
    with padding but not end with it. Reads the device for the mask's last column, and for the counter unless it
    is known on the host (a fresh state's, see new_state): for prompts, not steps (a one-token chunk is refused
    before any read). A read waits for the queued work, which leaves the device idle while the prompt's first
    operations are issued."""
    if x.shape[1] < 2 or torch.compiler.is_compiling():
        return False
    if _host_seen(state.seen) != 0:
        return False
    return attention_mask is None or bool(attention_mask[:, -1].all())


# What the last eager capacity check left in each state's ``seen`` counter: id(seen) -> (weak reference, the
# version counter expected after the caller's one ``seen.add_(T)``, the value then). A step whose ``seen`` still
# has that version takes the value from here instead of reading the device (a synchronisation per layer and
# step in an eager decode loop). Any other in-place change of ``seen`` bumps its version, and a mismatch reads
# the device again. CUDA-graph replays advance ``seen`` without a version bump: a counter that was ever
# captured keeps version None and is always read; once torch.compile has traced a check, nothing is recorded.
_SEEN_HOST: dict[int, tuple[Any, int | None, int]] = {}
_SEEN_HOST_OFF = False


def _note(table: dict, t: Tensor, version: int | None, value: Any) -> None:
    """Note ``value`` for tensor t in ``table`` (by identity, while t lives), valid while t's version counter
    stays ``version``; version None (t was captured in a CUDA graph) makes t's note void for good."""
    key = id(t)
    rec = table.get(key)
    if rec is not None and rec[0]() is t:
        if rec[1] is None:
            return  # captured once: never noted again
        ref = rec[0]
    else:
        ref = weakref.ref(t, lambda _ref: table.pop(key, None))
    table[key] = (ref, version, value)


def _noted(table: dict, t: Tensor) -> Any:
    """The value noted for t in ``table`` if its version has not moved since (else None)."""
    rec = table.get(id(t))
    if rec is None or rec[0]() is not t or rec[1] is None:
        return None
    return rec[2] if rec[1] == t._version else None


def new_state(cls: type[State], batch_size: int, device, **fields: tuple[tuple[int, ...], torch.dtype]) -> State:
    """A new state of ``cls``: each field ``name=(shape, dtype)`` a ``[batch_size, *shape]`` tensor holding its
    declared fill (state_field; what reset_ leaves), and the counters zero. On the GPU one launch fills them all
    (kernels.state_fill; one per tensor was six launches for an eviction_swa state, whose host time counts in a
    host-bound prompt). ``seen`` is noted as 0 on the host (see _SEEN_HOST) and ``pad`` as open rows (see
    _PAD_OPEN) while nothing changes them, so that the first checks of a state read nothing from the device and the
    first chunk's check_row_open issues nothing (a check and an assert per layer)."""
    seen = torch.empty((), dtype=torch.long, device=device)
    pad = torch.empty(batch_size, dtype=torch.long, device=device)
    made = {name: torch.empty(batch_size, *shape, dtype=dt, device=device) for name, (shape, dt) in fields.items()}
    fills = _field_fills(cls)
    state_fill.fill_([seen, pad, *made.values()], [0, 0, *(fills[name] for name in made)])
    if not torch.compiler.is_compiling():  # nothing host-side is traced
        _record_seen(seen, seen._version, 0)
        _note(_PAD_OPEN, pad, pad._version, True)
    return cls(seen=seen, pad=pad, **made)


@functools.cache
def _field_fills(cls: type[State]) -> dict[str, float]:
    return {f.name: f.metadata.get("fill", 0.0) for f in dataclasses.fields(cls)}


def _record_seen(seen_t: Tensor, version: int | None, value: int) -> None:
    _note(_SEEN_HOST, seen_t, version, value)


def _recorded_seen(seen_t: Tensor) -> int | None:
    return _noted(_SEEN_HOST, seen_t)


def _notes_kept(seen_t: Tensor) -> bool:
    """Whether ``seen`` values are noted for this counter: not after torch.compile traced a check, and not for
    an inference tensor (no version counter)."""
    return not (_SEEN_HOST_OFF or seen_t.is_inference())


def _host_seen(seen_t: Tensor) -> int:
    """The counter's value: noted on the host when its version has not moved since, else read from the device."""
    seen = _recorded_seen(seen_t) if _notes_kept(seen_t) else None
    return int(seen_t) if seen is None else seen


def check_capacity(name: str, state: State, T: int, capacity: int) -> None:
    """Refuse to write T more tokens into a KV cache of ``capacity`` slots (linear-growth mixers); the caller
    then advances ``state.seen`` by T with one ``add_``.

    Eager, this raises ValueError, knowing ``state.seen`` from the previous check when nothing else changed it
    since (its version counter tells), else reading it on the host; while compiling or capturing a CUDA graph
    it is an asynchronous device assert (no host read is possible there)."""
    global _SEEN_HOST_OFF
    seen_t = state.seen
    compiling = torch.compiler.is_compiling()
    if compiling or (seen_t.is_cuda and torch.cuda.is_current_stream_capturing()):
        if compiling:
            _SEEN_HOST_OFF = True
        else:
            _record_seen(seen_t, None, 0)  # replays will advance it unseen
        msg = f"{name}: decoding past max_seqlen={capacity} (the KV cache is full)"
        torch._assert_async(seen_t + T <= capacity, msg)
        return
    seen = _host_seen(seen_t)
    if seen + T > capacity:
        raise ValueError(
            f"{name}: decoding {T} tokens at position {seen} exceeds max_seqlen={capacity} "
            f"(the KV-cache capacity); pass a larger max_seqlen to init_state"
        )
    if _notes_kept(seen_t):
        _record_seen(seen_t, seen_t._version + 1, seen + T)
