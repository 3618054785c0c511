"""The one comparison the tests and the conformance suite use: ``assert_close`` and its dtype tolerance table; and
``OpCounter``, which counts the operations a call issues (each one a kernel launch on a GPU)."""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter", "assert_close", "tolerance"]

# dtype -> (max abs error for exact-algebra comparisons in that dtype, relative RMSE for outputs, for gradients).
# docs/conformance.md#tolerances: float32 differs from a float32 reference only by the reduction order; half
# precision is judged by relative RMSE against a float32 reference (bf16: 1e-2 outputs, 2e-2 gradients).
_TOLERANCES = {
    torch.float64: (1e-9, 1e-9, 1e-9),
    torch.float32: (2e-4, 1e-5, 1e-5),
    torch.bfloat16: (None, 1e-2, 2e-2),
    torch.float16: (None, 5e-3, 1e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float | None, float, float]:
    """(max abs error or None, relative RMSE for outputs, relative RMSE for gradients) for ``dtype``."""
    if dtype not in _TOLERANCES:
        raise KeyError(f"tolerance: no bounds for {dtype}; known: {', '.join(str(d) for d in _TOLERANCES)}")
    return _TOLERANCES[dtype]


def assert_close(
    name: str,
    ref: Tensor,
    out: Tensor,
    dtype: torch.dtype | None = None,
    *,
    grad: bool = False,
    atol: float | None = None,
    rtol: float = 0.0,
    rel_rmse: float | None = None,
    rms_floor: float = 0.0,
) -> None:
    """Print the max abs error and relative RMSE of ``out`` against ``ref``; raise AssertionError past the bounds.

    ref, out: tensors (or numbers) of the same shape, compared in float64 on the CPU; ``out`` must be finite.
    Bounds: every element within ``atol + rtol * |ref|`` (when ``atol`` is given) and
    ``rms(out - ref) / max(rms(ref), rms_floor) <= rel_rmse`` (when ``rel_rmse`` is given). With neither given,
    both come from ``tolerance(dtype)``: its max abs error, and its relative RMSE for outputs or, with
    ``grad=True``, for gradients.
    """
    ref = torch.as_tensor(ref).detach().to("cpu", torch.float64)
    out = torch.as_tensor(out).detach().to("cpu", torch.float64)
    if ref.shape != out.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{name}: non-finite values in the output")
    if rtol and atol is None:
        raise ValueError(f"assert_close({name!r}): rtol={rtol} needs atol (the bound is atol + rtol * |ref|)")
    if atol is None and rel_rmse is None:
        if dtype is None:
            raise ValueError(f"assert_close({name!r}): pass dtype (bounds from the table) or atol / rel_rmse")
        atol, rr_out, rr_grad = tolerance(dtype)
        rel_rmse = rr_grad if grad else rr_out
    diff = (out - ref).abs()
    if diff.numel():
        err = diff.max().item()
        rms_ref = max(ref.square().mean().sqrt().item(), rms_floor, 1e-30)  # 1e-30: a zero reference
        rr = diff.square().mean().sqrt().item() / rms_ref
    else:
        err = rr = 0.0
    msg = f"{name}: max abs err {err:.3e}, rel RMSE {rr:.3e}"
    print(msg)
    where = "" if dtype is None else f" [{dtype}]"
    if atol is not None:
        bad = ~(diff <= atol + rtol * ref.abs())  # ~(<=): a NaN in the reference fails too
        if bad.any():
            if rtol:
                raise AssertionError(
                    f"{msg} ({bad.sum().item()} of {bad.numel()} elements past the allowed "
                    f"{atol:.1e} + {rtol:.1e} * |ref|){where}"
                )
            raise AssertionError(f"{msg} (allowed max abs err {atol:.1e}){where}")
    if rel_rmse is not None and not rr <= rel_rmse:
        floor = f", rms(ref) floored at {rms_floor:g}" if rms_floor else ""
        raise AssertionError(f"{msg} (allowed rel RMSE {rel_rmse:.1e}{floor}){where}")


_NO_LAUNCH = (torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.scalar_tensor)


class OpCounter(TorchDispatchMode):
    """Counts the aten operations issued under it in ``ops`` (keyed ``str(func)``, e.g. ``"aten.mm.default"``),
    except those of Triton's interpreter (the argument copies around an interpreted launch: a compiled launch
    issues none). ``launches_only=True`` also leaves out views, allocations (the caching allocator, no kernel)
    and wrapped Python scalars, which launch nothing.

        with OpCounter() as count:
            mixer(x, state)
        n = sum(count.ops.values())
    """

    def __init__(self, *, launches_only: bool = False):
        super().__init__()
        self.launches_only = launches_only
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        while frame is not None and not frame.f_globals.get("__name__", "").startswith("triton."):
            frame = frame.f_back
        free = self.launches_only and (func.is_view or func.overloadpacket in _NO_LAUNCH)
        if frame is None and not free:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))
