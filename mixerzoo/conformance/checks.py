"""The conformance checks (docs/conformance.md#the-checks), written once and run over every registered mixer.

Each check takes a ``Case`` (a registered mixer on one device and dtype, small shapes) and raises
``AssertionError`` with the measured error when the mixer does not conform.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
from collections.abc import Callable

import torch
from torch import Tensor

from ..mixers.base import State, TokenMixer
from ..registry.core import MixerSpec
from ..registry.core import spec as core_spec
from ..testing import assert_close, tolerance

__all__ = ["CHECKS", "Case", "Skip", "assert_close", "core_spec", "tolerance"]

HIDDEN, HEADS, BATCH = 64, 4, 2


class Skip(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by a check that does not apply to a mixer; the message is the reason shown."""


def _assert_equal(name: str, a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
        raise AssertionError(f"{name}: tensors differ ({tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype})")


# --------------------------------------------------------------------------------------------------
# A case: one mixer, one device, one dtype
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    spec: MixerSpec
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    hidden_size: int = HIDDEN
    num_heads: int = HEADS
    batch_size: int = BATCH

    @property
    def seqlen(self) -> int:
        return self.spec.conformance_seqlen

    @property
    def name(self) -> str:
        return self.spec.name

    def kwargs(self, **over) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            **self.spec.conformance_kwargs,
            **over,
        }

    def build(self, *, seed: int = 0, train: bool = False, dtype: torch.dtype | None = None, **over) -> TokenMixer:
        torch.manual_seed(seed)
        mixer = self.spec.cls(self.spec.make_config(**self.kwargs(**over)))
        mixer = mixer.to(device=self.device, dtype=dtype or self.dtype)
        return mixer.train(train)

    def input(self, *, seed: int = 1, T: int | None = None, dtype: torch.dtype | None = None, B=None) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        shape = (B or self.batch_size, T or self.seqlen, self.hidden_size)
        return torch.randn(shape, generator=g).to(device=self.device, dtype=dtype or self.dtype)

    def init_state(self, mixer: TokenMixer, B: int | None = None, T: int | None = None) -> State:
        return mixer.init_state(
            B or self.batch_size,
            device=self.device,
            dtype=mixer_dtype(mixer),
            max_seqlen=(T or self.seqlen) + 80,
        )


def mixer_dtype(mixer: TokenMixer) -> torch.dtype:
    p = next(iter(mixer.parameters()), None)
    return p.dtype if p is not None else torch.float32


def _decode_atol(case: Case) -> float:
    atol, _, _ = tolerance(case.dtype)
    return atol if atol is not None else 0.05


def _stream(mixer: TokenMixer, x: Tensor, state: State, chunks: list[int]) -> Tensor:
    """Feed x through the mixer in chunks of the given sizes, continuing ``state``."""
    ys, t = [], 0
    for n in chunks:
        y, state = mixer(x[:, t : t + n], state)
        ys.append(y)
        t += n
    assert t == x.shape[1], "chunks must cover x"
    return torch.cat(ys, dim=1)


def _no_dropout(case: Case) -> dict[str, float]:
    return {f.name: 0.0 for f in dataclasses.fields(case.spec.config) if "dropout" in f.name}


@contextlib.contextmanager
def _full_float32():
    """No TF32 inside a check: float32 is compared with a float32 reference at float32 bounds. cuDNN
    convolutions default to TF32 on Ampere and later (torch.backends.cudnn.allow_tf32 = True)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def check_contract(case: Case) -> None:
    """1. Shape and dtype contract; finite outputs; parallel form returns no state."""
    for train in (False, True):
        mixer = case.build(train=train)
        for T in (1, case.seqlen):
            x = case.input(T=T)
            y, state = mixer(x)
            if state is not None:
                raise AssertionError(f"{case.name}: parallel form (state=None) must return (y, None)")
            if y.shape != x.shape or y.dtype != x.dtype or y.device != x.device:
                raise AssertionError(
                    f"{case.name}: y is {tuple(y.shape)} {y.dtype} {y.device}, "
                    f"x is {tuple(x.shape)} {x.dtype} {x.device}"
                )
            if not torch.isfinite(y).all():
                raise AssertionError(f"{case.name} (train={train}, T={T}): non-finite output")


@torch.no_grad()
def check_causality(case: Case) -> None:
    """2. Changing x[:, t+1:] leaves y[:, :t+1] unchanged (eval and train)."""
    for train in (False, True):
        mixer = case.build(train=train)
        x = case.input()
        T = x.shape[1]
        for t in (0, T // 3, T - 2):
            x2 = x.clone()
            x2[:, t + 1 :] = case.input(seed=7, T=T)[:, t + 1 :]
            torch.manual_seed(3)
            y1, _ = mixer(x)
            torch.manual_seed(3)
            y2, _ = mixer(x2)
            assert_close(f"{case.name} causality (train={train}, t={t})", y1[:, : t + 1], y2[:, : t + 1], atol=1e-5)
            # A NaN (or Inf) after t must not reach outputs up to t either.
            for bad in (float("nan"), float("inf")):
                x3 = x.clone()
                x3[:, t + 1] = bad
                torch.manual_seed(3)
                y3, _ = mixer(x3)
                assert_close(
                    f"{case.name} causality with {bad} at t={t + 1} (train={train})",
                    y1[:, : t + 1],
                    y3[:, : t + 1],
                    atol=1e-5,
                )


@torch.no_grad()
def check_decode(case: Case) -> None:
    """3. Parallel eval forward == prefill of a prefix + token-by-token decode of the rest."""
    mixer = case.build()
    x = case.input()
    T = x.shape[1]
    y_par, _ = mixer(x)
    for prefix in (1, T // 3):
        state = case.init_state(mixer)
        y_dec = _stream(mixer, x, state, [prefix] + [1] * (T - prefix))
        assert_close(f"{case.name} prefill({prefix}) + decode vs parallel", y_par, y_dec, atol=_decode_atol(case))


@torch.no_grad()
def check_chunked_prefill(case: Case) -> None:
    """4. Chunked prefill with uneven chunks == one prefill (outputs, then the next decode step)."""
    mixer = case.build()
    x = case.input()
    T = x.shape[1]
    s1 = case.init_state(mixer)
    y1, s1 = mixer(x, s1)
    chunks = [5, 1, 13]
    chunks.append(T - sum(chunks))
    s2 = case.init_state(mixer)
    y2 = _stream(mixer, x, s2, chunks)
    atol = _decode_atol(case)
    assert_close(f"{case.name} chunked prefill {chunks} vs one prefill", y1, y2, atol=atol)
    nxt = case.input(seed=5, T=1)
    assert_close(f"{case.name} decode after chunked prefill", mixer(nxt, s1)[0], mixer(nxt, s2)[0], atol=atol)


def _padded(x: Tensor, lead: list[int], trail: list[int], fill: float) -> tuple[Tensor, Tensor]:
    """Row b holds the first ``T - lead[b] - trail[b]`` tokens of x[b] after ``lead[b]`` padding tokens
    and before ``trail[b]`` (padding holds ``fill``): x [B, T, D] -> (xp [B, T, D], mask [B, T])."""
    B, T, D = x.shape
    xp = torch.full((B, T, D), fill, dtype=x.dtype, device=x.device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=x.device)
    for b in range(B):
        n = T - lead[b] - trail[b]
        xp[b, lead[b] : lead[b] + n] = x[b, :n]
        mask[b, lead[b] : lead[b] + n] = True
    return xp, mask


@torch.no_grad()
def check_padding(case: Case) -> None:
    """Padding (attention_mask): left, right and both. Real tokens get the outputs of the unpadded
    sequence, padding outputs are 0, NaN or Inf in padding reaches nothing, in the parallel form and
    through prefill + decode; a mask with a hole between real tokens raises ValueError."""
    if not case.spec.padding:
        raise Skip("the mixer declares supports_padding=False")
    mixer = case.build()
    B = case.batch_size
    x = case.input(B=B)
    T = x.shape[1]
    atol = _decode_atol(case)
    layouts = {"left": ([3] + [0] * (B - 1), [0] * B), "right": ([0] * B, [4] + [0] * (B - 1))}
    layouts["both"] = ([2] + [0] * (B - 1), [3] + [5] * (B - 1))
    unpadded: dict[tuple[int, int], Tensor] = {}
    for kind, (lead, trail) in layouts.items():
        for fill in (0.0, float("inf"), float("nan")):
            xp, mask = _padded(x, lead, trail, fill)
            y_pad, _ = mixer(xp, attention_mask=mask)
            for b in range(B):
                n = int(mask[b].sum())
                if (b, n) not in unpadded:
                    unpadded[b, n] = mixer(x[b : b + 1, :n])[0]
                y_row = unpadded[b, n]
                got = y_pad[b : b + 1, lead[b] : lead[b] + n]
                hint = " (a mixer that cannot take padding declares supports_padding = False)" if fill == 0.0 else ""
                assert_close(
                    f"{case.name} {kind}-padded row {b}, padding {fill} (parallel){hint}", y_row, got, atol=atol
                )
            if not bool((y_pad[~mask] == 0).all()):
                raise AssertionError(f"{case.name}: {kind} padding, fill {fill}: padding outputs must be 0")
            if not case.spec.decode or fill == fill:  # streamed once per layout, with NaN padding
                continue
            # The same through a prefill of the first half and token-by-token decode of the rest.
            state = case.init_state(mixer, T=xp.shape[1])
            prefix = xp.shape[1] // 2
            ys = [mixer(xp[:, :prefix], state, attention_mask=mask[:, :prefix])[0]]
            for t in range(prefix, xp.shape[1]):
                ys.append(mixer(xp[:, t : t + 1], state, attention_mask=mask[:, t : t + 1])[0])
            y_stream = torch.cat(ys, 1)
            assert_close(f"{case.name} {kind} padding {fill}, prefill + decode vs parallel", y_pad, y_stream, atol=atol)

    hole = torch.ones(B, T, dtype=torch.bool, device=case.device)
    hole[0, T // 2] = False
    _expect(ValueError, (case.name, "attention_mask"), "a mask with a hole", lambda: mixer(x, attention_mask=hole))


def _compile_counter(backend: str):
    from torch._dynamo.testing import CompileCounterWithBackend

    return CompileCounterWithBackend(backend)


def check_compile(
    case: Case,
    backend: str = "aot_eager",
    decode_steps: int = 64,
    train_modes: tuple[bool, ...] = (False, True),
) -> None:
    """5. torch.compile(fullgraph=True) of the forward (train and eval) and of one decode step:
    same results as eager, no graph break, ``decode_steps`` decode steps without a recompile."""
    import torch._dynamo

    torch._dynamo.reset()
    atol = _decode_atol(case)
    for train in train_modes:
        mixer = case.build(train=train)
        x = case.input()
        counter = _compile_counter(backend)
        fwd = torch.compile(lambda inp, m=mixer: m(inp)[0], backend=counter, fullgraph=True)
        with torch.no_grad():
            torch.manual_seed(11)
            y_eager, _ = mixer(x)
            torch.manual_seed(11)
            y_comp = fwd(x)
        assert_close(f"{case.name} compiled forward ({backend}, train={train})", y_eager, y_comp, atol=atol)
        if counter.frame_count != 1:
            raise AssertionError(f"{case.name}: compiled forward made {counter.frame_count} graphs, expected 1")

    if not case.spec.decode:
        return
    torch._dynamo.reset()
    mixer = case.build()
    x = case.input(T=case.seqlen + decode_steps)
    prefix = case.seqlen
    s_eager, s_comp = case.init_state(mixer, T=x.shape[1]), case.init_state(mixer, T=x.shape[1])
    counter = _compile_counter(backend)

    def step(inp, st):
        return mixer(inp, st)

    step_c = torch.compile(step, backend=counter, fullgraph=True)
    with torch.no_grad():
        mixer(x[:, :prefix], s_eager)
        mixer(x[:, :prefix], s_comp)
        for t in range(prefix, x.shape[1]):
            y_e, _ = mixer(x[:, t : t + 1], s_eager)
            y_c, s_comp = step_c(x[:, t : t + 1], s_comp)
            assert_close(f"{case.name} compiled decode step ({backend}) at t={t}", y_e, y_c, atol=atol)
    if counter.frame_count != 1:
        raise AssertionError(
            f"{case.name}: {decode_steps} compiled decode steps made {counter.frame_count} graphs "
            f"(a recompile as the position grows), expected 1"
        )
    for k, t in s_eager.tensors().items():
        assert_close(
            f"{case.name} state '{k}' after compiled decode",
            t.double(),
            getattr(s_comp, k).double(),
            atol=atol,
        )


def check_compile_inductor(case: Case) -> None:
    """5b. The same under Inductor, eval forward and decode step (Inductor compiles take seconds on the CPU)."""
    check_compile(case, backend="inductor", decode_steps=24, train_modes=(False,))


def check_gradients(case: Case) -> None:
    """6. Gradients finite and equal to the float32 reference's; float64 gradcheck on the CPU reference path.

    The reference runs on the CPU. Off the CPU the two draw from different random streams, so every
    ``*dropout*`` field of the config is set to 0 for that comparison (dropout still runs in the
    causality and compile checks, and in this one on the CPU)."""
    ref_case = dataclasses.replace(case, device="cpu", dtype=torch.float32)
    same_stream = {} if case.device == "cpu" else _no_dropout(case)
    mixer = case.build(train=True, **same_stream)
    ref = ref_case.build(train=True, **same_stream)
    ref.load_state_dict({k: v.float().cpu() for k, v in mixer.state_dict().items()})
    x = case.input().requires_grad_()
    x_ref = x.detach().float().cpu().requires_grad_()
    torch.manual_seed(13)
    y, _ = mixer(x)
    torch.manual_seed(13)
    y_ref, _ = ref(x_ref)
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(2))
    y.backward(dy.to(device=case.device, dtype=case.dtype))
    y_ref.backward(dy)
    _, rr_out, rr_grad = tolerance(case.dtype)
    assert_close(f"{case.name} train output vs float32 reference", y_ref, y.detach().float().cpu(), rel_rmse=rr_out)
    assert_close(f"{case.name} dx vs float32 reference", x_ref.grad, x.grad.float().cpu(), rel_rmse=rr_grad)
    ref_params = dict(ref.named_parameters())
    for n, p in mixer.named_parameters():
        if p.grad is None:
            continue  # parameters outside the training path (e.g. a decode-only buffer) may get none
        assert_close(
            f"{case.name} d{n} vs float32 reference",
            ref_params[n].grad,
            p.grad.float().cpu(),
            rel_rmse=rr_grad,
        )
    if not any(p.grad is not None for p in mixer.parameters()) and any(True for _ in mixer.parameters()):
        raise AssertionError(f"{case.name}: no parameter received a gradient in training mode")

    if case.device == "cpu" and case.dtype == torch.float32:
        # The full Jacobian (not fast mode, which checks one random projection of it), on a tiny config,
        # under the config overrides that make the gradient the exact derivative (exact_grad_kwargs).
        small = dataclasses.replace(case, dtype=torch.float64, batch_size=1, hidden_size=8)
        m64 = small.build(train=True, **case.spec.cls.exact_grad_kwargs)
        x64 = small.input(T=min(case.seqlen, 20)).mul_(0.5).requires_grad_()  # 160 inputs: 320 forwards

        def f(inp):
            torch.manual_seed(17)
            return m64(inp)[0]

        try:
            torch.autograd.gradcheck(f, (x64,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=False)
        except torch.autograd.gradcheck.GradcheckError as e:
            raise AssertionError(f"{case.name}: float64 gradcheck (full Jacobian) failed: {e}") from e


def check_autocast(case: Case) -> None:
    """6b. Training under ``torch.autocast(bfloat16)``, as trainers run it: a float32 mixer whose projections then
    give bfloat16 (its own ops meet bfloat16 activations and float32 parameters) runs forward and backward, at
    T = 3 (shorter than a block or a window) and T = ``conformance_seqlen``; the output, dx and every parameter
    gradient are within the bfloat16 bounds of the same mixer without autocast. Then inference, as generation
    under autocast runs it: a state in the mixer's dtype (``init_state``'s default) filled by one prefill, or by
    uneven chunks, then a decode step; the outputs are within the same bounds of the run without autocast (under
    ``choice_free_kwargs``: a kept token or selected block that rounding reorders is no error)."""
    mixer = case.build(train=True, **_no_dropout(case))
    params = [(n, p) for n, p in mixer.named_parameters() if p.requires_grad]
    _, rr_out, rr_grad = tolerance(torch.bfloat16)
    for T in (3, case.seqlen):
        x = case.input(T=T, seed=5).requires_grad_()
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(x.device)
        runs = []
        for amp in (False, True):
            torch.manual_seed(13)
            with torch.autocast(torch.device(case.device).type, dtype=torch.bfloat16, enabled=amp):
                y, _ = mixer(x)
            grads = torch.autograd.grad(y, [x, *(p for _, p in params)], dy.to(y.dtype), allow_unused=True)
            runs.append((y, grads))
        (y32, g32), (y16, g16) = runs
        if y16.shape != x.shape:
            raise AssertionError(f"{case.name} under autocast: y is {tuple(y16.shape)}, x is {tuple(x.shape)}")
        where = f"{case.name} under bfloat16 autocast (T={T})"
        assert_close(f"{where}: output", y32.detach(), y16.detach().float(), rel_rmse=rr_out, rms_floor=1e-3)
        for name, a, b in zip(["x", *(n for n, _ in params)], g32, g16, strict=True):
            if a is None or b is None:
                if (a is None) != (b is None):
                    raise AssertionError(f"{where}: d{name} is {'missing' if b is None else 'extra'} under autocast")
                continue
            assert_close(f"{where}: d{name}", a, b.float(), rel_rmse=rr_grad, rms_floor=1e-3)
    mixer = case.build(**_no_dropout(case), **case.spec.cls.choice_free_kwargs).eval()
    x = case.input(seed=7)
    T = x.shape[1]
    for chunks in ([T - 1, 1], [T // 2, 1, T - T // 2 - 2, 1]):
        runs = []
        for amp in (False, True):
            with torch.no_grad(), torch.autocast(torch.device(case.device).type, dtype=torch.bfloat16, enabled=amp):
                runs.append(_stream(mixer, x, case.init_state(mixer), chunks).float())
        where = f"{case.name} under bfloat16 autocast: prefill {chunks[:-1]} + decode with a {mixer_dtype(mixer)} state"
        assert_close(where, runs[0], runs[1], rel_rmse=rr_out, rms_floor=1e-3)


def _graph_size(t: Tensor) -> int:
    """Autograd nodes reachable from t (0 without history)."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return len(seen)


def check_state_autograd(case: Case) -> None:
    """Decode in grad mode: state updates record no autograd history, so the graph of a step does not
    grow with the steps before it (memory stays flat), and backward through calls that share a state
    works, with gradients reaching each call's own inputs only."""
    if not case.spec.decode:
        raise Skip("the mixer has no decode state")
    mixer = case.build()
    steps = 48
    x = case.input(T=8 + steps).requires_grad_()
    state = case.init_state(mixer, T=x.shape[1])
    mixer(x[:, :8], state)
    sizes = []
    for t in range(8, x.shape[1]):
        y, state = mixer(x[:, t : t + 1], state)
        sizes.append(_graph_size(y))
        held = [k for k, v in state.tensors().items() if v.requires_grad or v.grad_fn is not None]
        if held and not case.spec.cls.trains_through_state:
            raise AssertionError(f"{case.name}: decode in grad mode left autograd history on state fields {held}")
    if sizes[-1] != sizes[4] and not case.spec.cls.trains_through_state:
        raise AssertionError(
            f"{case.name}: the autograd graph of one decode step grows with the steps before it "
            f"({sizes[4]} nodes at step 5, {sizes[-1]} at step {steps}): memory grows without bound"
        )

    # Two calls sharing a state: backward of both outputs works; the second call's input gets the
    # gradient it gets from a copy of the state (no gradient crosses calls through the state).
    x = case.input(T=12)
    x1, x2 = x[:, :8].clone().requires_grad_(), x[:, 8:].clone().requires_grad_()
    state = case.init_state(mixer)
    y1, state = mixer(x1, state)
    twin = state.select(list(range(case.batch_size)))
    y2, state = mixer(x2, state)
    (y1.square().sum() + y2.square().sum()).backward()
    if x1.grad is None or x2.grad is None or not (torch.isfinite(x1.grad).all() and torch.isfinite(x2.grad).all()):
        raise AssertionError(f"{case.name}: backward through two calls sharing a state gave no or non-finite grads")
    if not case.spec.cls.trains_through_state:
        x2b = x2.detach().clone().requires_grad_()
        y2b, _ = mixer(x2b, twin)
        y2b.square().sum().backward()
        assert_close(f"{case.name} grad of the second call's input", x2b.grad, x2.grad, atol=1e-6)
        x1b = x1.detach().clone().requires_grad_()
        y1b, _ = mixer(x1b, case.init_state(mixer))
        y1b.square().sum().backward()
        assert_close(
            f"{case.name} grad of the first call's input (none through the state)", x1b.grad, x1.grad, atol=1e-6
        )


@torch.no_grad()
def check_state(case: Case) -> None:
    """7. Safetensors round trip (bit exact, and decoding continues identically), select, reset_,
    constant nbytes for constant-growth mixers."""
    from safetensors.torch import load, save

    mixer = case.build()
    x = case.input()
    T = x.shape[1]
    state = case.init_state(mixer)
    fresh = case.init_state(mixer)
    n0 = state.nbytes()
    mixer(x[:, : T - 3], state)
    blob = save(state.to_dict())
    restored = type(state).from_dict(load(blob))
    for k, t in state.tensors().items():
        _assert_equal(f"{case.name} state '{k}' after safetensors round trip", t.cpu(), restored.tensors()[k].cpu())
    restored = type(state).from_dict({k: v.to(case.device) for k, v in restored.tensors().items()})
    y_a = _stream(mixer, x[:, T - 3 :], state, [1, 2])
    y_b = _stream(mixer, x[:, T - 3 :], restored, [1, 2])
    _assert_equal(f"{case.name} decode after a state round trip", y_a, y_b)

    # select: reversing the batch of the state reverses the outputs that follow
    s1 = case.init_state(mixer)
    mixer(x[:, :-1], s1)
    rev = s1.select(list(range(case.batch_size))[::-1])
    y_fwd, _ = mixer(x[:, -1:], s1)
    y_rev, _ = mixer(x.flip(0)[:, -1:], rev)
    assert_close(f"{case.name} decode after state.select(reversed)", y_fwd.flip(0), y_rev, atol=_decode_atol(case))
    one = s1.select([1])
    if one.batch_size != 1:
        raise AssertionError(f"{case.name}: select([1]) gave batch size {one.batch_size}")

    if case.spec.state_growth == "constant":
        s2 = case.init_state(mixer, T=T + 100)
        for t in range(3):
            mixer(case.input(seed=20 + t, T=T), s2)
            if s2.nbytes() != n0:
                raise AssertionError(f"{case.name}: constant-growth state changed size: {n0} -> {s2.nbytes()} bytes")

    state.reset_()
    for k, t in state.tensors().items():
        _assert_equal(f"{case.name} state '{k}' after reset_", t, fresh.tensors()[k])
    buf = io.BytesIO(save(fresh.to_dict()))
    if not buf.getbuffer().nbytes:
        raise AssertionError(f"{case.name}: empty serialised state")


def _expect(exc: type[BaseException], fragments: tuple[str, ...], what: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except exc as e:
        msg = str(e)
        missing = [f for f in fragments if f not in msg]
        if missing:
            raise AssertionError(f"{what}: error message {msg!r} does not mention {missing}") from e
        return
    except Exception as e:  # a different exception type is a failure too
        raise AssertionError(f"{what}: expected {exc.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"{what}: expected {exc.__name__}, nothing was raised")


@torch.no_grad()
def check_bad_input(case: Case) -> None:
    """8. Bad input raises a clear error naming the mixer and the value seen."""
    name = case.name
    mixer = case.build()
    x = case.input(T=5)
    H = case.hidden_size
    _expect(
        ValueError,
        (name, str(H + 1), str(H)),
        "wrong hidden size",
        lambda: mixer(torch.zeros(2, 5, H + 1, device=case.device, dtype=case.dtype)),
    )
    _expect(ValueError, (name, "rank"), "rank 2 input", lambda: mixer(x[0]))
    _expect(TypeError, (name, "int64"), "integer input", lambda: mixer(x.long()))
    other = torch.float16 if case.dtype != torch.float16 else torch.bfloat16
    _expect(TypeError, (name, str(other)), "dtype other than the parameters'", lambda: mixer(x.to(other)))
    _expect(ValueError, (name, "meta"), "device mix", lambda: mixer(x.to("meta")))
    _expect(
        ValueError,
        (name, "attention_mask"),
        "mask of the wrong shape",
        lambda: mixer(x, attention_mask=torch.ones(2, 4, dtype=torch.bool, device=case.device)),
    )

    floats = [
        f.name
        for f in dataclasses.fields(case.spec.config)
        if isinstance(f.default, float) and not isinstance(f.default, bool)
    ]
    for field in floats[:1]:
        _expect(
            ValueError,
            (name, field, "nan"),
            f"NaN config value {field}",
            lambda field=field: case.spec.make_config(**case.kwargs(**{field: float("nan")})),
        )

    if not case.spec.decode:
        return
    _expect(ValueError, (name, "batch_size", "-1"), "init_state(batch_size=-1)", lambda: mixer.init_state(-1))
    _expect(
        TypeError, (name, "dtype", "int64"), "an integer state dtype", lambda: mixer.init_state(2, dtype=torch.int64)
    )
    good = case.init_state(mixer)
    for k, t in good.tensors().items():
        if t.is_floating_point() and t.dim() > 0:
            wrong = type(good)(**{**good.tensors(), k: t.to(torch.int32)})
            _expect(TypeError, (name, k, "int32"), f"an int32 state field {k}", lambda wrong=wrong: mixer(x, wrong))
            break
    negative = {**good.to_dict(), "seen": torch.tensor(-1, device=good.seen.device)}
    _expect(ValueError, ("seen", "-1"), "a negative seen counter", lambda: type(good).from_dict(negative))
    state = case.init_state(mixer, B=3)
    _expect(ValueError, (name, "batch size 3"), "state of another batch size", lambda: mixer(x, state))

    @dataclasses.dataclass(eq=False)
    class _Foreign(State):
        pass

    foreign = _Foreign(seen=torch.zeros((), dtype=torch.long), pad=torch.zeros(2, dtype=torch.long))
    _expect(TypeError, (name, "_Foreign"), "state of another mixer", lambda: mixer(x, foreign))
    if case.spec.state_growth == "linear":
        s = mixer.init_state(2, device=case.device, dtype=case.dtype, max_seqlen=8)
        mixer(x, s)
        _expect(ValueError, (name, "max_seqlen"), "decoding past max_seqlen", lambda: mixer(x, s))
    _expect(
        ValueError,
        (name, "hidden_size"),
        "invalid config value",
        lambda: case.spec.make_config(**case.kwargs(hidden_size=0)),
    )
    _expect(
        TypeError,
        (name, "hiden_size"),
        "unknown config field",
        lambda: case.spec.make_config(**case.kwargs(), hiden_size=3),
    )


def _without_tf32(check: Callable[[Case], None]) -> Callable[[Case], None]:
    @functools.wraps(check)
    def run(case: Case) -> None:
        with _full_float32():
            check(case)

    return run


CHECKS: dict[str, Callable[[Case], None]] = {
    name: _without_tf32(fn)
    for name, fn in {
        "contract": check_contract,
        "causality": check_causality,
        "decode": check_decode,
        "chunked_prefill": check_chunked_prefill,
        "padding": check_padding,
        "compile": check_compile,
        "compile_inductor": check_compile_inductor,
        "gradients": check_gradients,
        "autocast": check_autocast,
        "state": check_state,
        "state_autograd": check_state_autograd,
        "bad_input": check_bad_input,
    }.items()
}
