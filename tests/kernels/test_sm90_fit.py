"""The default CUDA tiles of the attention kernels, and the swa tile table's, fit an H100 / H200, checked without a GPU.

Each kernel is compiled for sm_90 on this machine, with the tile sizes its launcher picks by default,
in bf16 and float32, at head dims 64, 128 and 256, and its shared memory must stay within the 227 KiB a
Hopper block may use: a tile that needs more fails at launch only, on the GPU (it happened twice: the
float32 dQ of swa at D = 128, the bf16 dq of eviction at D = 256). Spills and speed are the benchmarks'
business, not this test's. The compiles run in a child process: the tests' TRITON_INTERPRET=1 turns
every @triton.jit function into an interpreted one, which cannot be compiled.
"""

import inspect
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # compiles or long loops: left out of the default run, run by -m slow

triton = pytest.importorskip("triton")

HOPPER_SMEM = 227 * 1024
# float32 at D = 256 compiles slowly (the exact-float32 dots spill) and shares its tiles with D = 128
CASES = [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.bfloat16, 256), (torch.float32, 128)]
SCALARS = {"T": "i32", "W": "i32", "S": "i32", "CHUNK": "i32", "qk_scale": "fp32", "sm_scale": "fp32"}
SCALARS.update(scale="fp32", scale_log2="fp32")
INDEX_POINTERS = {"pad": "*i64", "kpos": "*i32", "kend": "*i32", "kcum": "*i32"}
FLOAT32_POINTERS = {"lse", "delta"}


def _shared_bytes(fn, constexprs: dict, dtype: torch.dtype) -> int:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = dict(constexprs)
    options = {key: consts.pop(key) for key in ("num_warps", "num_stages")}
    params = list(inspect.signature(fn.fn).parameters)
    data = "*fp32" if dtype == torch.float32 else "*bf16"

    def kind(name: str) -> str:
        if name in consts:
            return "constexpr"
        if name in SCALARS:
            return SCALARS[name]
        if name.startswith("stride"):
            return "i32"
        if name in INDEX_POINTERS:
            return INDEX_POINTERS[name]
        return "*fp32" if name in FLOAT32_POINTERS else data

    signature = {name: kind(name) for name in params}
    # what the JIT specialises on the GPU: 16-byte aligned pointers (the tile loads are then pipelined)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(params) if signature[name].startswith("*")}
    source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).metadata.shared


class _OnCuda:
    """What the eviction launcher's tile choice reads from q, without a CUDA tensor."""

    def __init__(self, dtype: torch.dtype, D: int):
        self.device, self.dtype, self.shape = torch.device("cuda"), dtype, (1, 1, 1, D)


def _swa_kernels(dtype: torch.dtype, D: int):
    from mixerzoo.kernels.swa import swa

    prec = "ieee" if dtype == torch.float32 else "tf32"
    shape = dict(HQ=16, G=1, D=D, pad=None, HAS_PAD=False, PREC=prec)  # no padding: pad is None, as launched
    for name, fn, config in (
        ("fwd", swa._swa_fwd_kernel, swa._fwd_config),
        ("dkdv", swa._swa_bwd_dkdv_kernel, swa._dkdv_config),
        ("dq", swa._swa_bwd_dq_kernel, swa._dq_config),
    ):
        cfg = swa._fit_dtype(config(D), dtype, D)
        flags = swa._loop_flags(cfg, name)  # pops ONE_LOOP
        consts = {**shape, **cfg, **flags}
        if "BS" in inspect.signature(fn.fn).parameters:
            consts["BS"] = swa._sink_block(4)
        yield f"swa {name}", fn, consts


def _swa_table_kernels(dtype: torch.dtype, D: int):
    """Every sm90 rule of the shipped swa tile table at head dim D (its group range's lower end), and for a dK/dV
    rule the sink kernel, which runs with the dK/dV tiles."""
    from mixerzoo.kernels.swa import swa
    from mixerzoo.kernels.swa.tuned import SWA_TABLE

    fns = {"fwd": swa._swa_fwd_kernel, "dkdv": swa._swa_bwd_dkdv_kernel, "dq": swa._swa_bwd_dq_kernel}
    for i, rule in enumerate(SWA_TABLE.load(SWA_TABLE.default_file).get("sm90", [])):
        if rule["D"] != D:
            continue
        cfg = dict(rule["config"])
        flags = swa._loop_flags(cfg, rule["kernel"])
        shape = dict(HQ=16, G=rule["G"][0], D=D, pad=None, HAS_PAD=False, PREC="tf32")
        consts = {**shape, **cfg, **flags}
        if "BS" in inspect.signature(fns[rule["kernel"]].fn).parameters:
            consts["BS"] = swa._sink_block(4)
        yield f"swa table rule {i} {rule['kernel']}", fns[rule["kernel"]], consts
        if rule["kernel"] == "dkdv":
            sink = {k: v for k, v in consts.items() if k not in ("BN", "ONE_LOOP", "TMA")}
            yield f"swa table rule {i} dkdv sink", swa._swa_bwd_dkdv_sink_kernel, {**sink, "BS": swa._sink_block(4)}


def _eviction_kernels(dtype: torch.dtype, D: int):
    from mixerzoo.kernels._triton import dot_precision
    from mixerzoo.kernels.eviction import attention as ev

    shape = dict(HQ=16, HKV=16, D=D, BD=D, PREC=dot_precision(torch.empty(0, dtype=dtype)), OPEN_ENDED=True)
    for name, fn in (
        ("fwd", ev._eviction_fwd_kernel),
        ("dq", ev._eviction_bwd_dq_kernel),
        ("dkdv", ev._eviction_bwd_dkdv_kernel),
        ("listed", ev._eviction_bwd_dkdv_kernel),
    ):
        consts = {**shape, **ev.default_tiles(_OnCuda(dtype, D), name)}
        if fn is ev._eviction_bwd_dkdv_kernel:
            consts["LISTED"] = name == "listed"
        yield f"eviction {name}", fn, consts


def _eviction_table_kernels(dtype: torch.dtype, D: int):
    """Every sm90 rule of the eviction tile table at head dim D, when the package has one."""
    from mixerzoo.kernels._triton import dot_precision
    from mixerzoo.kernels.eviction import attention as ev
    from mixerzoo.kernels.eviction.tuned import EVICTION_TABLE

    if not EVICTION_TABLE.default_file.exists():
        return
    fns = {"fwd": ev._eviction_fwd_kernel, "dq": ev._eviction_bwd_dq_kernel, "dkdv": ev._eviction_bwd_dkdv_kernel}
    fns["listed"] = ev._eviction_bwd_dkdv_kernel
    for i, rule in enumerate(EVICTION_TABLE.load(EVICTION_TABLE.default_file).get("sm90", [])):
        if rule["D"] != D:
            continue
        HQ = 16
        shape = dict(HQ=HQ, HKV=HQ // rule["G"][0], D=D, BD=D, PREC=dot_precision(torch.empty(0, dtype=dtype)),
                     OPEN_ENDED=True)  # fmt: skip
        consts = {**shape, **rule["config"]}
        if fns[rule["kernel"]] is ev._eviction_bwd_dkdv_kernel:
            consts["LISTED"] = rule["kernel"] == "listed"
        yield f"eviction table rule {i} {rule['kernel']}", fns[rule["kernel"]], consts


def _too_big(family: str, dtype: torch.dtype, D: int) -> list[str]:
    families = {"swa": _swa_kernels, "swa-table": _swa_table_kernels, "eviction": _eviction_kernels,
                "eviction-table": _eviction_table_kernels}  # fmt: skip
    kernels = families[family](dtype, D)
    out = []
    for name, fn, consts in kernels:
        used = _shared_bytes(fn, consts, dtype)
        if used > HOPPER_SMEM:
            tiles = {k: v for k, v in consts.items() if k in ("BM", "BN", "BT", "BS", "BC", "num_stages")}
            out.append(f"{name} {dtype} D={D} {tiles}: {used // 1024} KiB")
    return out


@pytest.mark.parametrize("dtype,D", CASES, ids=[f"{str(d).removeprefix('torch.')}-D{D}" for d, D in CASES])
@pytest.mark.parametrize("family", ["swa", "eviction"])
def test_default_tiles_fit_hopper_shared_memory(family, dtype, D):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    args = [sys.executable, __file__, family, str(dtype).removeprefix("torch."), str(D)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    too_big = json.loads(done.stdout.strip().splitlines()[-1])
    assert not too_big, f"default tiles over {HOPPER_SMEM // 1024} KiB of shared memory: {too_big}"


TABLE_CASES = [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.bfloat16, 256)]


@pytest.mark.parametrize("dtype,D", TABLE_CASES, ids=[f"D{D}" for _, D in TABLE_CASES])
@pytest.mark.parametrize("op", ["swa", "eviction"])
def test_tile_tables_fit_hopper_shared_memory(op, dtype, D):
    # the measured rules ran on an H200, but not with every kernel that takes their tiles (swa's sink kernel)
    from mixerzoo.kernels.eviction.tuned import EVICTION_TABLE

    if op == "eviction" and not EVICTION_TABLE.default_file.exists():
        pytest.skip("no eviction tile table measured yet")
    test_default_tiles_fit_hopper_shared_memory(f"{op}-table", dtype, D)


if __name__ == "__main__":  # the child: python test_sm90_fit.py FAMILY DTYPE D -> JSON list of misfits
    family, dtype, D = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3])
    print(json.dumps(_too_big(family, dtype, D)))
