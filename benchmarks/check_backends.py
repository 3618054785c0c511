"""Check every full_attention backend that can run on this GPU against a float32 reference, in bf16.

    python benchmarks/check_backends.py          # prints a table; writes $OUT/backends.json (or ./backends.json)
    python benchmarks/check_backends.py --device cpu --small --backends sdpa     # a dry run of the script

For each backend (sdpa, flex, and flash_attn / xformers when importable; flash_attn is flash-attn 4 when
installed, else flash-attn 2, and the output names which) and a few shapes (GQA, left padding, T not a
multiple of a tile): the parallel forward and the input gradient, in bf16, against dense float32 attention
computed from the same weights (relative RMSE; allowed 1e-2 for outputs, 2e-2 for gradients). Also the
KV-cache path (prefill + decode) against the same reference. A backend that cannot be built here is listed
with its error and install hint, not checked; when none of the asked backends can be built, the script exits
with status 2. FlexAttention runs in eager mode here (an unfused implementation: right for checking, not for
timing). --device cuda (the default) needs a CUDA GPU; --device cpu runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import interpret_without_gpu, refuse, rel_rmse, require_gpu  # noqa: E402


def _import_torch_and_mixerzoo() -> None:
    """Imported once the arguments are parsed and the device checked (``--help`` and a refusal stay fast; a CPU
    run sets TRITON_INTERPRET before Triton is imported)."""
    global torch, registry, BACKENDS
    import torch

    from mixerzoo import registry
    from mixerzoo.baselines.backends import BACKENDS


TOL_OUT, TOL_GRAD = 1e-2, 2e-2
# (B, T, hidden, HQ, HKV, left padding of each row)
CASES = [
    (2, 1000, 512, 8, 2, None),
    (2, 777, 512, 8, 8, (0, 131)),
    (1, 4096, 2048, 16, 16, None),
]


def rope32(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    D = x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = pos.float()[..., None, None] * inv
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()), -1)


def reference(mixer, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Dense causal float32 attention from the mixer's weights. x [B, T, D] float32 -> [B, T, D]."""
    B, T, _ = x.shape
    pos = valid.long().cumsum(1) - 1
    HQ, HKV, Dh = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    w = {n: getattr(mixer, n).weight.float() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    q = rope32((x @ w["q_proj"].T).view(B, T, HQ, Dh), pos, mixer.rope_theta).transpose(1, 2)
    k = rope32((x @ w["k_proj"].T).view(B, T, HKV, Dh), pos, mixer.rope_theta).transpose(1, 2)
    v = (x @ w["v_proj"].T).view(B, T, HKV, Dh).transpose(1, 2)
    k, v = (t.repeat_interleave(HQ // HKV, dim=1) for t in (k, v))
    s = (q @ k.transpose(-1, -2)) * Dh**-0.5  # [B, HQ, T, T]
    vis = valid[:, None, None, :] & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    o = (p @ v).transpose(1, 2).reshape(B, T, HQ * Dh)
    return (o @ w["o_proj"].T) * valid[..., None]


def check(backend: str, case: tuple, device: str) -> dict:
    B, T, hidden, hq, hkv, pads = case
    torch.manual_seed(0)
    m = registry.build(
        "full_attention", hidden_size=hidden, num_heads=hq, num_kv_heads=hkv, backend=backend, max_seqlen=T
    )
    m = m.to(device=device, dtype=torch.bfloat16)
    x = torch.randn(B, T, hidden, device=device, dtype=torch.bfloat16)
    valid = torch.ones(B, T, dtype=torch.bool, device=device)
    for b, p in enumerate(pads or ()):
        valid[b, :p] = False
    mask = valid if pads else None
    row = {"backend": backend, "B": B, "T": T, "HQ": hq, "HKV": hkv, "D": hidden // hq, "padding": bool(pads)}

    x_ref = x.float().requires_grad_()
    y_ref = reference(m, x_ref, valid)
    dy = torch.randn_like(y_ref)
    (y_ref * valid[..., None]).backward(dy)
    xb = x.clone().requires_grad_()
    y, _ = m(xb, attention_mask=mask)
    (y * valid[..., None]).backward(dy.to(y.dtype))
    row["out_rel_rmse"] = rel_rmse(y_ref[valid], y.detach()[valid])
    row["dx_rel_rmse"] = rel_rmse(x_ref.grad[valid], xb.grad[valid])

    with torch.no_grad():  # the KV cache (SDPA over the cache): prefill 3/4, then 4 chunks of 1..
        st = m.init_state(B)
        cut = 3 * T // 4
        outs = [m(x[:, :cut], st, attention_mask=None if mask is None else mask[:, :cut])[0]]
        for a in range(cut, T, max(1, (T - cut) // 4)):
            b = min(T, a + max(1, (T - cut) // 4))
            outs.append(m(x[:, a:b], st)[0])
        yc = torch.cat(outs, 1)
    row["cache_rel_rmse"] = rel_rmse(y_ref.detach()[valid], yc[valid])
    row["ok"] = bool(
        row["out_rel_rmse"] <= TOL_OUT and row["dx_rel_rmse"] <= TOL_GRAD and row["cache_rel_rmse"] <= TOL_OUT
    )
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="default cuda")
    ap.add_argument("--small", action="store_true", help="small shapes (a dry run of the script)")
    ap.add_argument("--backends", help="comma-separated subset (default: every backend of full_attention)")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        require_gpu("check_backends.py", "--device cuda", cpu="check_backends.py --device cpu --small --backends sdpa")
    else:
        interpret_without_gpu("check_backends.py")
    _import_torch_and_mixerzoo()
    names = args.backends.split(",") if args.backends else list(BACKENDS)
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        ap.error(f"--backends: unknown backend(s) {','.join(unknown)}; the backends are {', '.join(BACKENDS)}")
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    torch.backends.cuda.matmul.allow_tf32 = False  # a float32 reference
    cases = [(2, 37, 64, 4, 2, None), (2, 45, 64, 4, 4, (0, 7))] if args.small else CASES
    rows, unavailable, packages = [], {}, {}
    for backend in names:
        try:
            m = registry.build("full_attention", hidden_size=64, num_heads=4, backend=backend)
        except (ImportError, RuntimeError) as e:
            unavailable[backend] = f"{type(e).__name__}: {e}"
            continue
        if m.flash_attn is not None:
            packages[backend] = m.flash_attn.name
    if len(unavailable) == len(names):
        refuse(
            f"check_backends.py: none of the backends {','.join(names)} can run here: "
            + "; ".join(unavailable.values())
        )
    for backend in names:
        if backend in unavailable:
            continue
        for case in cases:
            try:
                rows.append(check(backend, case, args.device))
            except Exception as e:  # a failure is recorded and makes the script fail, after the table
                rows.append({"backend": backend, "case": str(case), "ok": False, "error": f"{type(e).__name__}: {e}"})
            print(rows[-1], flush=True)
    cols = ["backend", "B", "T", "HQ", "HKV", "D", "padding", "out_rel_rmse", "dx_rel_rmse", "cache_rel_rmse", "ok"]
    print("\n" + "  ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(
            "  ".join(
                f"{r.get(c, '-'):>14.3e}" if isinstance(r.get(c), float) else f"{r.get(c, '-')!s:>14}" for c in cols
            )
        )
    for b, name in packages.items():
        print(f"{b}: {name}")
    for b, e in unavailable.items():
        print(f"{b}: not run here ({e})")
    doc = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "torch": torch.__version__,
        "tolerance": {"out_rel_rmse": TOL_OUT, "dx_rel_rmse": TOL_GRAD, "cache_rel_rmse": TOL_OUT},
        "rows": rows,
        "packages": packages,
        "unavailable": unavailable,
    }
    out = pathlib.Path(os.environ.get("OUT", "."))
    (out / "backends.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
