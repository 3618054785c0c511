"""The one-pass eviction prompt's state kernel (kernels/eviction/prefill.py) against the same writes in torch ops:
the buffer (slots from the listed keys or from positions, empty slots cleared, left padding), the ring and the
router's context, for strided inputs and slot tensors; and its sm_90 compile. The mixer's tests
(tests/mixers/test_eviction_prefill.py) run it inside whole prompts against the chunked prefill."""

import pytest
import torch

from mixerzoo import registry
from mixerzoo.kernels.eviction.prefill import prompt_state_write
from mixerzoo.mixers.eviction_swa import _NONE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _expected(st, kr, v, u, score, slot, empty, kpos, pad, margin):
    """The same state, written slot by slot with torch ops (the specification)."""
    B, T, H, _ = kr.shape
    W, n_ctx = st.win_k.shape[1], st.ctx_u.shape[1]
    b = torch.arange(B)[:, None, None]
    h = torch.arange(H)[None, None, :]
    p = kpos.long()[b, h, slot] if kpos is not None else slot  # [B, C, H] positions
    row = (p + (0 if pad is None else pad[:, None, None])).clamp(max=T - 1)
    e4 = empty[..., None]
    out = {
        "buf_k": kr[b, row, h].masked_fill(e4, 0),
        "buf_v": v[b, row, h].masked_fill(e4, 0),
        "buf_score": score[b, row, h].masked_fill(empty, _NONE),
        "buf_pos": p.masked_fill(empty, -1),
    }
    win_k, win_v, win_score = st.win_k.clone(), st.win_v.clone(), st.win_score.clone()
    for t in range(max(0, T - W), T):
        win_k[:, t % W], win_v[:, t % W] = kr[:, t], v[:, t]
        win_score[:, t % W] = _NONE if t >= T - margin else score[:, t]
    ctx = torch.cat((st.ctx_u, u), 1)[:, T:]
    out.update(win_k=win_k, win_v=win_v, win_score=win_score, ctx_u=ctx[:, ctx.shape[1] - n_ctx :])
    return out


@pytest.mark.parametrize("T", [5, 40, 300], ids=lambda t: f"T{t}")  # shorter than the context, the window, C
@pytest.mark.parametrize("from_list", [True, False], ids=["listed", "positions"])
@pytest.mark.parametrize("padded", [False, True], ids=["", "padded"])
def test_prompt_state_write_matches_torch(T, from_list, padded):
    torch.manual_seed(T)
    kw = dict(hidden_size=48, num_heads=4, num_kv_heads=2, window_size=16, capacity=24, num_sinks=2)
    m = registry.build("eviction_swa", **kw)  # head dim 12: padded to a block of 16
    B, H, D, C = 2, 2, 12, 24
    st = m.init_state(B, device=DEVICE, dtype=torch.float32)
    margin = st.ctx_u.shape[1] // 2
    proj = torch.randn(B, T, 3 * H * D, device=DEVICE)  # k and v as views with a row stride, as the mixer's are
    kr = torch.randn(B, T, H, D, device=DEVICE)
    v = proj[..., H * D : 2 * H * D].view(B, T, H, D)
    u = torch.cat((torch.randn_like(kr), v), -1)
    score = torch.randn(B, T, H, device=DEVICE)
    kpos = None
    if from_list:
        kpos = torch.randint(0, T + 1, (B, H, T), device=DEVICE, dtype=torch.int32)  # T: an unlisted entry
        slot = torch.randint(0, T, (B, H, C), device=DEVICE).permute(0, 2, 1)  # [B, C, H], strided
    else:
        slot = torch.randint(0, T, (B, C, H), device=DEVICE)
    empty = (torch.rand(B, H, C, device=DEVICE) < 0.3).permute(0, 2, 1)
    pad = torch.tensor([0, min(3, T - 1)], device=DEVICE) if padded else None
    want = _expected(st, kr, v, u, score, slot, empty, kpos, pad, margin)
    prompt_state_write(st, kr, v, u, score, slot, empty, kpos=kpos, pad=pad, margin=margin, none_score=_NONE)
    for name, x in want.items():
        assert torch.equal(getattr(st, name), x), name


_SM90_PROMPT_STATE = """
import inspect, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mixerzoo.kernels.eviction import prefill

fn = prefill._eviction_prompt_state_kernel
params = list(inspect.signature(fn.fn).parameters)
ints = {"T", "t0", "n_ring", "n_ctx", "nb_buf", "nb_ring"} | {p for p in params if p.startswith("s_")}
for dt, D, from_list, has_pad in (("bf16", 128, True, False), ("bf16", 64, False, True), ("fp32", 256, True, True)):
    consts = dict(H=16, C=512, W=769, M=6, D=D, BD=D, BR=16, FROM_LIST=from_list, HAS_PAD=has_pad)
    consts.update({} if from_list else {"kpos": None}, **({} if has_pad else {"pad": None}))
    kinds = dict(score="fp32", win_score="fp32", buf_score="fp32", buf_pos="i64", pad="i64", slot="i64", empty="i1",
                 kpos="i32")
    sig = {p: "constexpr" if p in consts else "i32" if p in ints else "fp32" if p == "none_score" else
           "*" + kinds.get(p, dt) for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if sig[p].startswith("*")}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 2 if D <= 64 else 4})
    print(dt, D, "shared", kernel.metadata.shared)
"""


@pytest.mark.slow
def test_prompt_state_kernel_compiles_for_sm90(compile_in_child):
    """The kernel compiles for sm_90 at the launcher's settings (bf16 and float32, D = 64 to 256, from the listed
    keys or from positions, with and without padding). In a child process: the tests' TRITON_INTERPRET=1 makes
    every kernel an interpreted one."""
    out = compile_in_child(_SM90_PROMPT_STATE)
    assert out.count("shared") == 3, out
