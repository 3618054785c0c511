"""Compile a kernel for Hopper (sm_90) without a GPU and read what the compiler made of it: shared memory, registers,
spills, whether ptxas serialised its wgmma, and whether a wgmma loop copies a tile into shared memory; and how many
programs of a kernel one SM holds by its registers and by its shared memory (``programs_per_sm``, ``register_cap``).

For the tests (``tests/kernels/test_sm90_fit.py``) and ``benchmarks/sass_report.py``. Triton's wheel carries ptxas and
nvdisasm; nothing here needs a CUDA device or driver. ``TRITON_INTERPRET=1`` must be unset before Triton loads (an
interpreted @triton.jit function cannot be compiled)."""

from __future__ import annotations

import inspect
import pathlib
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch

__all__ = [
    "HOPPER_SM",
    "SASSReport",
    "cap_adding_a_program",
    "compile_sm90",
    "eviction_kernel",
    "programs_per_sm",
    "register_cap",
    "report",
    "swa_kernel",
]

_SCALARS = {"T": "i32", "W": "i32", "S": "i32", "CHUNK": "i32", "qk_scale": "fp32", "sm_scale": "fp32"}
_SCALARS.update(scale="fp32", scale_log2="fp32", n_batch="i32", KV0="i32", NB="i32", HEAD_STRIDE="i32")
_INDEX_POINTERS = {"pad": "*i64", "kpos": "*i32", "kend": "*i32", "kcum": "*i32"}
_FLOAT32_POINTERS = {"lse", "delta", "vflag"}
_OPTIONS = ("num_warps", "num_stages", "maxnreg")  # compile options, not constexprs, among a launch's keys

# one Hopper SM: 64K 32-bit registers, allocated per warp in units of 256 (8 per thread); 228 KiB of shared memory, of
# which each resident block takes 1 KiB more than its own; at most 64 resident warps
HOPPER_SM = {"registers": 65536, "shared": 228 * 1024, "warps": 64}


def programs_per_sm(registers: int, shared: int, num_warps: int, sm: dict | None = None) -> tuple[int, int]:
    """(by registers, by shared memory): how many programs of ``num_warps`` warps, each thread holding ``registers``
    registers and the program ``shared`` bytes of shared memory, one SM can hold at once as each resource counts; the
    smaller is what runs. ``sm``: the SM's limits as ``HOPPER_SM`` gives them (the default). Where registers bind and
    shared memory allows more, ``register_cap`` gives the cap (``maxnreg``) that would add a program."""
    sm = sm or HOPPER_SM
    per_warp = -(-registers // 8) * 8 * 32
    by_registers = min(sm["registers"] // (per_warp * num_warps), sm["warps"] // num_warps)
    return by_registers, sm["shared"] // (shared + 1024)


def register_cap(num_warps: int, programs: int, sm: dict | None = None) -> int:
    """The most registers per thread (a multiple of 8, at most 255) at which ``programs`` programs of ``num_warps``
    warps fit one SM's registers (``sm`` as in ``programs_per_sm``); 0 where fewer than 32 would be left: no cap can."""
    cap = (sm or HOPPER_SM)["registers"] // (programs * num_warps * 32) // 8 * 8
    return min(cap, 255) if cap >= 32 else 0


def cap_adding_a_program(registers: int, shared: int, num_warps: int, sm: dict | None = None) -> int:
    """The register cap (``maxnreg``) at which a kernel (as in ``programs_per_sm``) runs one program more per SM,
    where its registers hold it to fewer than its shared memory allows; 0 where they do not, or no cap can."""
    by_registers, by_shared = programs_per_sm(registers, shared, num_warps, sm)
    return register_cap(num_warps, by_registers + 1, sm) if by_registers < by_shared else 0


def compile_sm90(fn, constexprs: dict, dtype: torch.dtype, unaligned: tuple[str, ...] = ()):
    """``fn`` (a @triton.jit kernel) compiled for sm_90 with ``constexprs`` (num_warps, num_stages and optionally
    maxnreg among them) and its data pointers of ``dtype``, as the JIT specialises a launch on the GPU: 16-byte
    aligned pointers and integer strides divisible by 16 (contiguous [B, T, H, D] tensors whose H * D is a multiple of
    16). Without those the tile loads compile to 2-byte scalar loads without a pipeline (swa's forward: 49 KiB of
    shared memory instead of its 112). ``unaligned``: integer arguments compiled as not divisible by 16 (the strides
    of a head dim such as 40)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = dict(constexprs)
    options = {key: consts.pop(key) for key in _OPTIONS if key in consts}
    params = list(inspect.signature(fn.fn).parameters)
    # a constexpr left out would compile as a data pointer (a different kernel), not fail
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in consts and p.default is inspect._empty]
    if missing:
        raise ValueError(f"compile_sm90: {fn.fn.__name__} needs its constexprs {missing}, got {sorted(consts)}")
    # a constexpr with a default the launch leaves out takes that default, as the JIT does
    consts.update({p.name: p.default for p in fn.params if p.is_constexpr and p.name not in consts
                   and p.default is not inspect._empty})  # fmt: skip
    data = "*fp32" if dtype == torch.float32 else "*bf16"

    def kind(name: str) -> str:
        if name in consts:
            return "constexpr"
        if name in _SCALARS:
            return _SCALARS[name]
        if name.startswith("stride"):
            return "i32"
        if name in _INDEX_POINTERS:
            return _INDEX_POINTERS[name]
        return "*fp32" if name in _FLOAT32_POINTERS else data

    signature = {name: kind(name) for name in params}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(params)
        if (signature[name].startswith("*") or name.startswith("stride")) and name not in unaligned
    }
    source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def swa_kernel(kernel: str, D: int, G: int, cfg: dict, dtype: torch.dtype = torch.bfloat16, *, stash_bq: int = 0):
    """(kernel function, constexprs) that swa's launcher runs for ``kernel`` ("fwd", "dq", "dkdv") at head dim D (one
    the kernels do not take as it is: on two tiles where ``split_head`` splits it, else on the next one's tiles; DH =
    D; the config key SPLIT as the launchers take it), group G, 16 query heads, no padding, with tile config ``cfg``
    (as in a tile table). A dq config with STASH=True
    gives the stash dQ kernel; ``stash_bq`` > 0 gives the dK/dV kernel storing its score gradients for a stash dQ
    kernel of that many query rows."""
    from ._triton import dot_precision
    from .swa import swa

    fns = {"fwd": swa._swa_fwd_kernel, "dkdv": swa._swa_bwd_dkdv_kernel, "dq": swa._swa_bwd_dq_kernel}
    if kernel not in fns:
        raise ValueError(f"swa_kernel: kernel must be one of {sorted(fns)}, got {kernel!r}")
    cfg = dict(cfg)
    fn = swa._swa_bwd_dq_stash_kernel if kernel == "dq" and cfg.pop("STASH", False) else fns[kernel]
    regs = {swa._swa_fwd_kernel: "QREGS", swa._swa_bwd_dq_kernel: "QREGS", swa._swa_bwd_dkdv_kernel: "KVREGS"}
    flags = swa._loop_flags(cfg, kernel, regs.get(fn))  # pops ONE_LOOP, TMA and the register-operand key
    consts = dict(HQ=16, G=G, **swa._head_args(kernel, D, flags), pad=None, HAS_PAD=False)
    consts["PREC"] = dot_precision(torch.empty(0, dtype=dtype))
    consts.update(cfg, **flags)
    if kernel == "dkdv" and stash_bq:
        consts.update(BQ=stash_bq, STASH=True)
    params = inspect.signature(fn.fn).parameters
    if "BS" in params:
        consts["BS"] = swa._sink_block(4)
    return fn, {k: v for k, v in consts.items() if k in params or k in _OPTIONS}


def eviction_kernel(kernel: str, D: int, G: int, cfg: dict, dtype: torch.dtype = torch.bfloat16):
    """(kernel function, constexprs) that the eviction launchers run for ``kernel`` ("fwd", "dq", "dkdv", "listed")
    at head dim D, group G, 16 query heads, training semantics, with tile config ``cfg``; the grid order defaults as
    the launchers default it (``attention._grid``); a head dim that splits on two tiles unless cfg has SPLIT_HEAD=False
    (``attention._head_tiles``)."""
    from ._triton import dot_precision
    from .eviction import attention as ev

    fns = {"fwd": ev._eviction_fwd_kernel, "dq": ev._eviction_bwd_dq_kernel}
    fns.update(dkdv=ev._eviction_bwd_dkdv_kernel, listed=ev._eviction_bwd_dkdv_kernel)
    if kernel not in fns:
        raise ValueError(f"eviction_kernel: kernel must be one of {sorted(fns)}, got {kernel!r}")
    cfg, _ = ev._grid(dict(cfg), 16, 1, kernel in ("fwd", "dq"))
    consts = dict(HQ=16, HKV=16 // G, D=D, **ev._head_tiles(kernel, D, cfg), OPEN_ENDED=True)  # pops SPLIT_HEAD
    consts.update(PREC=dot_precision(torch.empty(0, dtype=dtype)), **cfg)
    if fns[kernel] is ev._eviction_bwd_dkdv_kernel:
        consts["LISTED"] = kernel == "listed"
    return fns[kernel], consts


@dataclass
class SASSReport:
    shared: int  # bytes of shared memory per block
    registers: int
    spills: int  # bytes of spill stores
    serialized: bool  # ptxas C7515: every wgmma waits for the one before
    loop_stores: list[str]  # plain shared-memory stores (STS*) inside loops that issue wgmma: a tile copied


def _tool(name: str) -> str:
    import triton

    return str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _loop_stores(sass: str) -> list[str]:
    ops, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
        elif instr := re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?(\S+)(.*?);", line):
            ops.append((instr.group(1), instr.group(2)))
    found = []
    for i, (op, rest) in enumerate(ops):
        target = re.search(r"`\((\.L_x_\d+)\)", rest) if op.startswith("BRA") else None
        if target and labels.get(target.group(1), i + 1) <= i:  # a backward branch closes a loop
            body = [o for o, _ in ops[labels[target.group(1)] : i + 1]]
            if any(o.startswith("HGMMA") for o in body):
                found += [o for o in body if o.startswith("STS")]
    return found


def report(kernel) -> SASSReport:
    """What ptxas and the SASS of a ``compile_sm90`` result say."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = pathlib.Path(tmp, "k.ptx"), pathlib.Path(tmp, "k.cubin")
        ptx.write_text(kernel.asm["ptx"])
        cubin.write_bytes(kernel.asm["cubin"])
        # the kernel's own cubin is what runs; ptxas -v on its PTX gives the figures and the warnings (the wheel's
        # ptxas, or the newer one it carries beside it where its PTX version is newer than the first knows)
        info = ""
        for name in ("ptxas", "ptxas-blackwell"):
            args = [_tool(name), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(pathlib.Path(tmp, "v.cubin"))]
            if not pathlib.Path(args[0]).exists():
                continue
            done = subprocess.run(args, capture_output=True, text=True)
            info = done.stderr
            if done.returncode == 0:
                break
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    return SASSReport(
        shared=kernel.metadata.shared,
        registers=int(regs.group(1)) if regs else -1,
        spills=int(spills.group(1)) if spills else -1,
        serialized="C7515" in info,
        loop_stores=_loop_stores(sass),
    )
