"""flash-attn 4's masked calls of sweep.py (``attention._fa4_masked``: swa_sink and eviction_train as a mask_mod,
with block sparsity) against a float32 PyTorch reference with the same mask, on tiny shapes. Needs a CUDA GPU and
flash-attn 4 (pip install flash-attn-4).

    python benchmarks/fa4_mask_check.py                    # every case, the block-sparse calls (as the sweep)
    python benchmarks/fa4_mask_check.py --dense            # also the mask_mod alone (no block sparsity)
    python benchmarks/fa4_mask_check.py --ops eviction_train

The masks (S = 4 sinks, G = HQ / HKV): swa_sink, key ki visible to query qi iff ki <= qi and (qi - ki < W or
ki < S); eviction_train, ki <= qi and (qi - ki < W or retained[b, h // G, ki]), retained an iid fraction ``--frac``
of the keys, the first S always. The reference: dense softmax attention in float32 with that mask, its gradients
by autograd. bf16 inputs; one line per case and call, PASS when the relative RMSE is <= 1e-2 for the output and
<= 2e-2 for dq, dk, dv (attention.py's bounds), FAIL above (or not finite), ERROR when the call raised (its
traceback follows; the forward and the backward are tried apart, so a backward error still shows the forward's
result). The run goes on after each. Exit status 0 when every line is PASS, 1 otherwise, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import inspect
import pathlib
import sys
import traceback

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]  # benchmarks/common.py, attention.py and the mixerzoo checkout
from common import rel_rmse, require_gpu  # noqa: E402

OPS = ("swa_sink", "eviction_train")
SINKS = 4
FLASH = (("flash_attn", "flash-attn-4"),)
FWD_BOUND, BWD_BOUND = 1e-2, 2e-2
# (B, T, HQ, HKV, D, W): MHA and MQA, head dims 64 and 128, a window that is no multiple of the blocks,
# and one D = 256 case (its sm90 tiles take 64-key blocks)
CASES = (
    (1, 256, 4, 4, 64, 64),
    (2, 512, 4, 1, 128, 128),
    (1, 1024, 4, 4, 128, 100),
    (2, 1024, 4, 1, 64, 128),
    (1, 512, 4, 4, 256, 128),
)


def visible_mask(op: str, T: int, HQ: int, W: int, retained, device):
    """Bool [B or 1, HQ or 1, T, T]: query qi sees key ki (the masks above; retained bool [B, HKV, T])."""
    t = torch.arange(T, device=device)
    qi, ki = t[:, None], t[None, :]
    causal = ki <= qi
    if op == "swa_sink":
        return (causal & ((qi - ki < W) | (ki < SINKS)))[None, None]
    kept = retained.repeat_interleave(HQ // retained.shape[1], 1)[:, :, None, :]  # [B, HQ, 1, T]
    return causal & ((qi - ki < W) | kept)


def reference(q, k, v, do, visible):
    """float32 dense masked softmax attention on [B, T, H, D] (GQA by repeating K/V), with autograd for the
    gradients -> o, dq, dk, dv."""
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    G = q.shape[2] // k.shape[2]
    kk, vv = kf.repeat_interleave(G, 2), vf.repeat_interleave(G, 2)
    s = torch.einsum("bthd,bshd->bhts", qf, kk) * q.shape[3] ** -0.5
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
    o = torch.einsum("bhts,bshd->bthd", p, vv)
    dq, dk, dv = torch.autograd.grad(o, (qf, kf, vf), do.float())
    return o.detach(), dq, dk, dv


def describe() -> None:
    """Versions, the GPU, flash_attn_func's signature and the sparse block sizes, once at the start."""
    import importlib.metadata as md

    from flash_attn.cute import flash_attn_func

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    major, minor = torch.cuda.get_device_capability()
    print(f"GPU {torch.cuda.get_device_name()} (sm{major}{minor}), torch {torch.__version__}")
    print(" | ".join(f"{d} {version(d)}" for d in ("flash-attn-4", "nvidia-cutlass-dsl", "quack-kernels")))
    print("flash_attn_func" + str(inspect.signature(flash_attn_func)))
    blocks = ", ".join(f"D={D}: {attention.fa4_sparse_block(D)}" for D in (64, 128, 256))
    print(f"sparse blocks (query rows, keys): {blocks}", flush=True)


def _errors(ref, out) -> list[float]:
    return [rel_rmse(r, x) if torch.isfinite(x).all() else float("inf") for r, x in zip(ref, out, strict=True)]


def run_case(op: str, case: tuple, frac: float, block_sparse: bool, log: list[str]) -> str:
    """One case through one call variant: prints its lines, returns PASS, FAIL or ERROR."""
    B, T, HQ, HKV, D, W = case
    G = HQ // HKV
    label = f"{op:14s} B={B} T={T:4d} HQ={HQ} HKV={HKV} D={D:3d} W={W:3d} {'sparse' if block_sparse else 'dense '}"
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (HQ, HKV, HKV))
    do = torch.randn_like(q)
    retained = None
    if op == "eviction_train":
        retained = torch.rand(B, HKV, T, device="cuda") < frac
        retained[:, :, :SINKS] = True
    ref = reference(q, k, v, do, visible_mask(op, T, HQ, W, retained, "cuda"))

    try:
        built = attention._fa4_masked(op, T, D, W, SINKS, G, retained, log, block_sparse=block_sparse)
        if built is None:
            print(f"ERROR {label}: flash-attn 4 does not import: {log[-1] if log else ''}", flush=True)
            return "ERROR"
        attn, how = built
        o = attn(q, k, v)
        torch.cuda.synchronize()
    except Exception as e:
        print(f"ERROR {label}: forward (build or call) raised {type(e).__name__}: {e}", flush=True)
        traceback.print_exc(file=sys.stdout)
        return "ERROR"
    err_o = _errors(ref[:1], [o])[0]
    line = f"{label}: rel RMSE o {err_o:.2e}"
    fwd_ok = err_o <= FWD_BOUND
    try:
        grads = torch.autograd.grad(o, (q, k, v), do)
        torch.cuda.synchronize()
    except Exception as e:
        fwd = "ok" if fwd_ok else "FAIL"
        print(f"ERROR {line} ({fwd}); backward raised {type(e).__name__}: {e}  [{how}]", flush=True)
        traceback.print_exc(file=sys.stdout)
        return "ERROR"
    err_g = _errors(ref[1:], grads)
    line += " dq {:.2e} dk {:.2e} dv {:.2e}".format(*err_g)
    ok = fwd_ok and max(err_g) <= BWD_BOUND
    status = "PASS" if ok else "FAIL"
    print(f"{status} {line}  [{how}]", flush=True)
    if not ok:  # where it differs most: the query of the output, the key of dk (a sink, a retained key?)
        diff = (o.float() - ref[0]).abs().amax(-1)  # [B, T, HQ]
        b, t, h = (int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        print(f"     largest o error {diff[b, t, h].item():.3e} at b={b} query {t} head {h}", flush=True)
        diff = (grads[1].float() - ref[2]).abs().amax(-1)  # [B, T, HKV]
        b, j, h = (int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        kind = "a sink" if j < SINKS else "retained" if retained is not None and retained[b, h, j] else "plain"
        print(f"     largest dk error {diff[b, j, h].item():.3e} at b={b} key {j} ({kind}) kv head {h}", flush=True)
    return status


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {', '.join(OPS)} (default both)")
    ap.add_argument("--dense", action="store_true", help="also run each case with the mask_mod alone")
    ap.add_argument("--frac", type=float, default=0.1, help="eviction_train's retained fraction (default 0.1)")
    args = ap.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    unknown = [o for o in ops if o not in OPS]
    if unknown or not ops:
        ap.error(f"--ops: unknown op(s) {','.join(unknown)}; the ops are {', '.join(OPS)}")
    if not 0 < args.frac < 1:
        ap.error(f"--frac must be in (0, 1), got {args.frac}")
    mode = " ".join(sys.argv[1:] if argv is None else argv) or "(the check)"
    require_gpu("fa4_mask_check.py", mode, cpu=None, packages=FLASH)

    global attention, torch
    import attention
    import torch

    attention._import_torch_and_kernels()
    describe()
    log: list[str] = []
    results = []
    for op in ops:
        for case in CASES:
            for block_sparse in (True, False) if args.dense else (True,):
                results.append(run_case(op, case, args.frac, block_sparse, log))
                torch.cuda.empty_cache()
    counts = {s: results.count(s) for s in ("PASS", "FAIL", "ERROR")}
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(results)}")
    return 0 if counts["PASS"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
