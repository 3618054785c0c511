"""Triton, or a stand-in where it is not installed (e.g. macOS) so that the kernel modules still import,
and what every op's kernels share: ``LOG2E``, the ``tl.dot`` precision, the online-softmax step, the exact masking of
non-finite value rows (``mask_scores``, ``any_nonfinite``).

The CPU implementations of every op run the plain-PyTorch references and never touch Triton; launching a
kernel (or calling any Triton helper) without Triton raises a RuntimeError with the install hint.
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "GRID_MAX",
    "HAS_TRITON",
    "OFFSET_LIMIT",
    "LOG2E",
    "LOG2E_JIT",
    "any_nonfinite",
    "batch_chunks",
    "batch_rows",
    "cat_batches",
    "cdiv",
    "dot_acc",
    "dot_precision",
    "interpreting",
    "launch",
    "mask_scores",
    "next_pow2",
    "pair_add_dot",
    "pair_cast_like",
    "pair_div",
    "pair_dot_nt",
    "pair_load",
    "pair_row_dot",
    "pair_scale",
    "pair_shift",
    "pair_store",
    "pair_zeros",
    "register_operand",
    "softmax_step",
    "tl",
    "triton",
]

_HINT = (
    "mixerzoo: the Triton kernels need the triton package (pip install triton; Linux with an NVIDIA GPU). "
    "CPU tensors run the PyTorch references, which do not need it."
)


class _NoTriton:
    """Stands in for ``triton`` and ``triton.language``: attributes resolve (for ``@triton.jit`` and
    ``tl.constexpr`` annotations at import time); anything that would run a kernel raises."""

    def __init__(self, path: str):
        self._path = path

    def __getattr__(self, name: str) -> _NoTriton:
        return _NoTriton(f"{self._path}.{name}")

    def __call__(self, *args, **kwargs):
        if self._path == "triton.jit":  # @triton.jit or @triton.jit(...)
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return _NoTriton(f"kernel {args[0].__name__}")
            return lambda fn: _NoTriton(f"kernel {fn.__name__}")
        raise RuntimeError(f"{_HINT} (called {self._path})")

    def __getitem__(self, grid):
        raise RuntimeError(f"{_HINT} (launched {self._path})")


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # not silent: every use of a kernel raises with the hint above
    triton, tl = _NoTriton("triton"), _NoTriton("triton.language")
    HAS_TRITON = False


# log2(e): the kernels exponentiate with exp2, so a softmax scale enters them as scale * LOG2E (host side) and a
# natural-log LSE converts with * or / LOG2E_JIT (kernel side: @triton.jit code may read only constexpr globals)
LOG2E = 1.4426950408889634
LOG2E_JIT = tl.constexpr(LOG2E) if HAS_TRITON else LOG2E


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' grids. Plain Python: ``triton.cdiv`` is a constexpr function whose call
    costs a few microseconds of host time (Triton 3.6), several times per launch of a decode step."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0), as ``triton.next_power_of_2`` gives, without its host cost."""
    if not isinstance(n, int):  # a symbolic size (torch.compile's fake tensors)
        return triton.next_power_of_2(n)
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1): launchers pick smaller tiles and
    fewer pipeline stages there."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(x: torch.Tensor) -> str:
    """The ``tl.dot`` input precision for inputs of x's dtype (a kernel's ``PREC``): exact float32 products
    ("ieee") for float32, so that a float32 kernel meets the float32 tolerances (TF32 misses them by ~1e-3);
    half-precision inputs run bf16 / fp16 tensor cores, where "tf32" only affects float32 operands among them."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


# Triton's launch path that ``launch`` shortens, as Triton 3.6 has it: JITFunction.device_caches[device] =
# (kernels, keys, target, backend, binder); binder(*args, **kwargs) -> (bound arguments, specialization, options);
# a CompiledKernel's launcher ``run``, ``function`` and ``packed_metadata``. Other versions launch as they are.
_FAST_VERSIONS = ((3, 6),)
_FAST_LAUNCH = (
    HAS_TRITON
    and tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit()) in _FAST_VERSIONS
    and os.environ.get("MIXERZOO_FAST_LAUNCH", "1") != "0"
)
if _FAST_LAUNCH:
    from triton import knobs as _knobs
    from triton.runtime.jit import JITFunction as _JITFunction


def _hooks_idle() -> bool:
    # no launch hook installed (a profiler such as proton adds one): the direct launch passes none
    hooks = (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook)
    return all(h is None or not getattr(h, "calls", True) for h in hooks)


# CUDA's limits on a launch grid, per axis: the first takes 2^31 - 1 programs, the second and third 65535 each
GRID_MAX = (2**31 - 1, 65535, 65535)
# the elements a kernel can address with 32-bit offsets: fewer than 2^31
OFFSET_LIMIT = 2**31


def _check_grid(kernel, grid: tuple) -> None:
    # a grid past CUDA's limits fails on the GPU with "invalid argument" alone; say which kernel and axis instead
    for axis, n in enumerate(grid):
        most = GRID_MAX[axis]
        if n > most:
            name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
            raise ValueError(
                f"{name}: launch grid {tuple(grid)} has {n} programs on axis {axis}, more than the {most} a CUDA "
                "grid takes there; split the batch into calls of fewer sequences"
            )


def batch_chunks(op: str, B: int, per_row: int, elems: int = 0) -> list[slice] | None:
    """None where ``op``'s kernels take B batch rows in one launch; else the slices of the batch, each as many rows
    as they take, that the launcher runs one after another (``cat_batches`` joins their outputs). The kernels take
    ``B * per_row`` programs on a grid's second axis (at most ``GRID_MAX[1]``) and, with ``elems`` (the elements one
    batch row adds to the largest tensor they address with 32-bit offsets), fewer than 2**31 such elements. A
    single row past either limit is an error naming ``op``."""
    rows = GRID_MAX[1] // per_row
    if elems:
        rows = min(rows, (OFFSET_LIMIT - 1) // elems)
    if rows >= B:
        return None
    if rows < 1:
        raise ValueError(
            f"{op}: one batch row takes {per_row} programs on a launch grid's second axis (at most {GRID_MAX[1]}) "
            f"and {elems} elements of a tensor addressed with 32-bit offsets (fewer than {OFFSET_LIMIT} allowed); "
            "split the sequence or the heads"
        )
    return [slice(b, min(b + rows, B)) for b in range(0, B, rows)]


def batch_rows(x: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """Rows ``rows`` of an optional batch-first tensor (a slice of ``batch_chunks``)."""
    return None if x is None else x[rows]


def grid_over(blocks: int, heads: int) -> tuple[tuple[int, int], bool]:
    """(grid, heads first) of a kernel over ``blocks`` per head and ``heads`` (batch rows x heads): [blocks, heads],
    or [heads, blocks] where the heads pass what a grid's second axis takes (``GRID_MAX[1]``); the kernel reads its
    axes by the flag (a ``HEADS_FIRST`` constexpr)."""
    first = heads > GRID_MAX[1]
    return ((heads, blocks) if first else (blocks, heads)), first


def cat_batches(parts: list) -> tuple:
    """The outputs of a launcher run on batch slices (tuples of tensors, the batch first), joined along the batch;
    None entries stay None."""
    return tuple(None if xs[0] is None else torch.cat(xs) for xs in zip(*parts, strict=True))


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` with less host work per launch.

    Triton's ``JITFunction.run`` binds and specialises the arguments (the pointers' 16-byte alignment, the
    integers equal to 1 or divisible by 16), looks the compiled kernel up, builds the launch metadata for the
    launch hooks and launches: 14 to 49 us of host time per launch on an H200's host (Triton 3.6), which a
    host-bound prompt or decode step pays for every kernel. Here the same binder (Triton's own, so the same
    specialisation) keys a table of the compiled kernels this function has launched, and a hit calls the
    compiled kernel's launcher directly: the launch-metadata dictionary, the cache key's string of the options,
    the globals check and the empty hook chains are left out. A miss, a new device, an installed launch hook or
    pre-run hook, torch.compile tracing, Triton's interpreter, a kernel that is not a plain ``JITFunction`` (a
    wrapper) or a Triton version other than those in ``_FAST_VERSIONS`` take ``kernel[grid]`` itself.
    ``MIXERZOO_FAST_LAUNCH=0`` turns the shortcut off. A grid past CUDA's limits (``GRID_MAX``) is refused with an
    error naming the kernel and the axis."""
    if callable(grid):
        given = grid

        def grid(meta):
            shape = given(meta)
            _check_grid(kernel, shape)
            return shape
    else:
        _check_grid(kernel, grid)
    if (
        not _FAST_LAUNCH
        or type(kernel) is not _JITFunction
        or kernel.pre_run_hooks
        or torch.compiler.is_compiling()
        or not _hooks_idle()
    ):
        kernel[grid](*args, **kwargs)
        return
    device = torch.cuda.current_device()
    caches = kernel.device_caches.get(device)  # a defaultdict: .get creates nothing
    if caches is None:  # the kernel's first launch on this device: Triton makes the binder
        kernel[grid](*args, **kwargs)
        return
    # the options Triton's run adds before binding (they enter its cache key)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or _knobs.runtime.debug
    kwargs["instrumentation_mode"] = _knobs.compilation.instrumentation_mode
    bound, spec, options = caches[4](*args, **kwargs)
    # on the kernel object: {(device, specialization, options): (launcher, function, packed metadata)}
    table = kernel.__dict__.get("_mixerzoo_launches")
    if table is None:
        table = kernel._mixerzoo_launches = {}
    key = (device, tuple(spec), tuple(options.items()))
    entry = table.get(key)
    if entry is None:  # compiled (or looked up) and launched by Triton; its compiled kernel kept for next time
        compiled = kernel[grid](*args, **kwargs)
        table[key] = (compiled.run, compiled.function, compiled.packed_metadata)
        return
    run, function, packed = entry
    if callable(grid):
        grid = grid(bound)
    n = len(grid)
    stream = torch._C._cuda_getCurrentRawStream(device)
    run(
        grid[0],
        grid[1] if n > 1 else 1,
        grid[2] if n > 2 else 1,
        stream,
        function,
        packed,
        None,
        None,
        None,
        *bound.values(),
    )


def launch_config(kernel: str, defaults: dict, keys: tuple[str, ...], config: dict | None) -> dict:
    """``defaults`` with ``config``'s overrides of a launcher's settings; keys outside ``keys`` are refused (they
    would reach the kernel launch as keyword arguments), the message naming ``kernel``."""
    unknown = sorted(set(config or {}) - set(keys))
    if unknown:
        raise ValueError(f"{kernel}: unknown config keys {unknown}; a config takes {keys}")
    return {**defaults, **(config or {})}


@triton.jit
def register_operand(x, T, ON: tl.constexpr):
    # x unchanged. With ON it passes through an integer XOR with 0 (T >> 31: T is a length, >= 0) that the compiler
    # cannot fold away, so that a loaded tile the loop only reads (a query block's Q or dO, a key block's K or V),
    # which every wgmma taking it as its A operand would otherwise read from shared memory, is held in registers
    # instead (wgmma's register-A form): less shared-memory traffic per step for more registers (the swa and
    # eviction kernels' QREGS and KVREGS keys). A split head's pair (see the pair_* helpers below): each part
    if isinstance(x, tl.tuple):
        x = tl.tuple([_register_operand_tile(x[0], T, ON), _register_operand_tile(x[1], T, ON)])
    else:
        x = _register_operand_tile(x, T, ON)
    return x


@triton.jit
def _register_operand_tile(x, T, ON: tl.constexpr):
    # register_operand of one tile
    if ON:
        if x.dtype.primitive_bitwidth == 16:
            x = (x.to(tl.int16, bitcast=True) ^ (T >> 31).to(tl.int16)).to(x.dtype, bitcast=True)
        else:
            x = (x.to(tl.int32, bitcast=True) ^ (T >> 31)).to(x.dtype, bitcast=True)
    return x


# A split head: a head dim such as 96 held as two tiles of powers of 2 (64 + 32 columns; swa's split_head), every
# head-dim-wide value (pointers, masks, tiles, accumulators) a pair built with tl.tuple([...]) (Triton's interpreter
# keeps a plain (a, b) a Python tuple, which isinstance(x, tl.tuple) does not match). The pair_* helpers take a tile
# or such a pair (resolved at compile time: a tile compiles as the plain operation); score products of pairs sum the
# two parts' products, products with P or dS are one per part.


@triton.jit
def pair_load(p, m):
    # tl.load(p, mask=m, other=0), of a tile or of a split head's pair of tiles
    if isinstance(p, tl.tuple):
        x = tl.tuple([tl.load(p[0], mask=m[0], other=0.0), tl.load(p[1], mask=m[1], other=0.0)])
    else:
        x = tl.load(p, mask=m, other=0.0)
    return x


@triton.jit
def pair_store(p, x, m):
    # x stored at p in p's dtype where m, a tile or a split head's pair
    if isinstance(p, tl.tuple):
        tl.store(p[0], x[0].to(p[0].dtype.element_ty), mask=m[0])
        tl.store(p[1], x[1].to(p[1].dtype.element_ty), mask=m[1])
    else:
        tl.store(p, x.to(p.dtype.element_ty), mask=m)


@triton.jit
def pair_shift(p, off):
    # pointers p + off, of a tile or a split head's pair
    if isinstance(p, tl.tuple):
        p = tl.tuple([p[0] + off, p[1] + off])
    else:
        p = p + off
    return p


@triton.jit
def pair_zeros(R: tl.constexpr, o_d):
    # float32 zeros [R, D] for the head-dim offsets o_d (a pair for a split head)
    if isinstance(o_d, tl.tuple):
        z = tl.tuple(
            [tl.zeros([R, o_d[0].shape[0]], dtype=tl.float32), tl.zeros([R, o_d[1].shape[0]], dtype=tl.float32)]
        )
    else:
        z = tl.zeros([R, o_d.shape[0]], dtype=tl.float32)
    return z


@triton.jit
def pair_dot_nt(a, b, PREC: tl.constexpr):
    # a @ b^T, [R, D] @ [D, C] -> [R, C]; for a split head the sum of the parts' products
    if isinstance(a, tl.tuple):
        s = tl.dot(a[0], tl.trans(b[0]), input_precision=PREC)
        s = tl.dot(a[1], tl.trans(b[1]), s, input_precision=PREC)
    else:
        s = tl.dot(a, tl.trans(b), input_precision=PREC)
    return s


@triton.jit
def pair_add_dot(acc, a, b, PREC: tl.constexpr):
    # acc + a @ b with a [R, C] cast to b's dtype, b [C, D]; for a split head (acc, b pairs) one product per part
    if isinstance(b, tl.tuple):
        a = a.to(b[0].dtype)
        acc = tl.tuple([acc[0] + tl.dot(a, b[0], input_precision=PREC), acc[1] + tl.dot(a, b[1], input_precision=PREC)])
    else:
        acc = acc + tl.dot(a.to(b.dtype), b, input_precision=PREC)
    return acc


@triton.jit
def pair_scale(x, f):
    # x * f, f a scalar or a column [R, 1]; a split head's parts alike
    if isinstance(x, tl.tuple):
        x = tl.tuple([x[0] * f, x[1] * f])
    else:
        x = x * f
    return x


@triton.jit
def pair_div(x, d):
    # x / d, d a column [R, 1]; a split head's parts alike
    if isinstance(x, tl.tuple):
        x = tl.tuple([x[0] / d, x[1] / d])
    else:
        x = x / d
    return x


@triton.jit
def pair_cast_like(x, t):
    # x in the dtype of the tile t (of its first part where t is a split head's pair)
    if isinstance(t, tl.tuple):
        x = x.to(t[0].dtype)
    else:
        x = x.to(t.dtype)
    return x


@triton.jit
def pair_row_dot(a, b):
    # rowsum(a * b) in float32 [R] (delta from O and dO); a split head's parts summed
    if isinstance(a, tl.tuple):
        r = tl.sum(a[0].to(tl.float32) * b[0].to(tl.float32), 1) + tl.sum(a[1].to(tl.float32) * b[1].to(tl.float32), 1)
    else:
        r = tl.sum(a.to(tl.float32) * b.to(tl.float32), 1)
    return r


@triton.jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    # acc + a @ b with input precision PREC. UPCAST: half-precision operands multiplied in float32 instead, exactly
    # (a bf16 or fp16 product is exact in float32: the same sums, another order), for Triton's interpreter, whose
    # bfloat16 tl.dot is wrong
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def softmax_step(b_s, b_v, b_max, b_sum, b_acc, qk_scale, PREC: tl.constexpr, SCALED: tl.constexpr, SAFE: tl.constexpr):
    # one key block of the online softmax, in log2 units: b_s [BM, BN] scores (-inf where not visible), b_v [BN, D];
    # running row max b_max, row sum b_sum [BM] and output b_acc [BM, D] in float32 -> the three updated.
    # SCALED: b_s is already multiplied by the scale; else qk_scale (> 0) multiplies the row max and sits inside
    # exp2's argument (one FMA per score). SAFE: rows with nothing visible yet keep max -inf and exponentiate
    # against 0 (exact zeros, not NaN); without it every row must have a finite max after this block.
    if SCALED:
        b_new = tl.maximum(b_max, tl.max(b_s, 1))
    else:
        b_new = tl.maximum(b_max, tl.max(b_s, 1) * qk_scale)
    if SAFE:
        b_ref = tl.where(b_new == float("-inf"), 0.0, b_new)
    else:
        b_ref = b_new
    if SCALED:
        b_p = tl.math.exp2(b_s - b_ref[:, None])
    else:
        b_p = tl.math.exp2(b_s * qk_scale - b_ref[:, None])
    b_r = tl.math.exp2(b_max - b_ref)
    b_sum = b_sum * b_r + tl.sum(b_p, 1)
    # [BM, BN] @ [BN, D] -> [BM, D]; a split head (b_v, b_acc pairs, see the pair_* helpers): one product per part
    if isinstance(b_acc, tl.tuple):
        b_pv = b_p.to(b_v[0].dtype)
        b_acc = tl.tuple(
            [
                b_acc[0] * b_r[:, None] + tl.dot(b_pv, b_v[0], input_precision=PREC),
                b_acc[1] * b_r[:, None] + tl.dot(b_pv, b_v[1], input_precision=PREC),
            ]
        )
    else:
        b_acc = b_acc * b_r[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
    return b_new, b_sum, b_acc


@triton.jit
def mask_scores(b_s, b_v, vis, EXACT: tl.constexpr):
    # scores outside vis -> -inf. EXACT: V rows holding a NaN / Inf are zeroed for the p @ V product (p = 0 times
    # NaN would reach the queries that cannot see them) and their visible scores set to NaN, so that exactly the
    # query rows that see such a row come out NaN. b_v a split head's pair (see the pair_* helpers): either part's rows
    if EXACT:
        if isinstance(b_v, tl.tuple):
            b_v0, ok0 = _finite_rows(b_v[0])
            b_v1, ok1 = _finite_rows(b_v[1])
            b_v, row_ok = tl.tuple([b_v0, b_v1]), ok0 & ok1
        else:
            b_v, row_ok = _finite_rows(b_v)
        b_s = tl.where(row_ok[None, :], b_s, float("nan"))
    return tl.where(vis, b_s, float("-inf")), b_v


@triton.jit
def _finite_rows(b_v):
    # b_v [BN, D] with its NaN / Inf entries zeroed, and which of its rows were finite [BN]
    v_ok = tl.abs(b_v.to(tl.float32)) < float("inf")
    row_ok = tl.min(v_ok.to(tl.int32), 1) != 0
    return tl.where(v_ok, b_v, 0.0), row_ok


@triton.jit
def any_nonfinite(acc):
    # block-uniform: does the accumulator hold a NaN / Inf (a NaN score makes its row of p, so of acc, NaN too);
    # a finite row sum that overflows only sends a finite block down the exact path, which is slower, not wrong.
    # A split head's pair (see the pair_* helpers): the row sums of both parts
    if isinstance(acc, tl.tuple):
        r = tl.sum(acc[0], 1) + tl.sum(acc[1], 1)
    else:
        r = tl.sum(acc, 1)
    return tl.min((tl.abs(r) < float("inf")).to(tl.int32), 0) == 0
