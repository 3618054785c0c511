"""The one-pass eviction prompt's kernels (kernels/eviction/prefill.py): the buffer's slots against a stable sort of
the members' flags, and the state against the same writes in torch ops (the buffer through the chunked prefill's
_fill_buffer: slots from the listed keys or from positions, empty slots cleared, left padding; the ring and the
router's context row by row), for strided inputs and slot tensors; and their sm_90 compile. The mixer's tests
(tests/mixers/test_eviction_prefill.py) run them inside whole prompts against the chunked prefill."""

import pytest
import torch
from torch import Tensor

from mixerzoo import registry
from mixerzoo.kernels.eviction.prefill import prompt_buffer_slots, prompt_state_write
from mixerzoo.mixers.eviction_swa import _NONE, _fill_buffer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _write_expected(st, kr, v, u, score, slot, empty, kpos, pad, margin):
    """The same state written with torch ops (the specification): the buffer by the chunked prefill's own
    _fill_buffer, the ring and the router's context row by row."""
    T, W = kr.shape[1], st.win_k.shape[1]
    p = kpos.long().permute(0, 2, 1).gather(1, slot) if kpos is not None else slot  # [B, C, H] positions
    rows = (p + (0 if pad is None else pad[:, None, None])).clamp(max=T - 1)
    _fill_buffer(st, rows, empty, kr, v, score, p)
    for t in range(max(0, T - W), T):
        st.win_k[:, t % W], st.win_v[:, t % W] = kr[:, t], v[:, t]
        st.win_score[:, t % W] = _NONE if t >= T - margin else score[:, t]
    st.ctx_u.copy_(torch.cat((st.ctx_u, u), 1)[:, T:])


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
    if padded:  # strided as the router's scores reach the kernel ([B, H, T] storage), contiguous otherwise
        score = torch.randn(B, H, T, device=DEVICE).permute(0, 2, 1)
    kpos = None
    if from_list:
        kpos = torch.randint(0, T + 1, (B, H, T), device=DEVICE, dtype=torch.int32)  # T: an unlisted entry
        slot = torch.randint(0, T, (B, H, C), device=DEVICE).permute(0, 2, 1)  # [B, C, H], strided
    else:
        slot = torch.randint(0, T, (B, C, H), device=DEVICE)
    empty = (torch.rand(B, H, C, device=DEVICE) < 0.3).permute(0, 2, 1)
    pad = torch.tensor([0, min(3, T - 1)], device=DEVICE) if padded else None
    want = m.init_state(B, device=DEVICE, dtype=torch.float32)
    _write_expected(want, kr, v, u, score, slot, empty, kpos, pad, margin)
    slot = slot.int() if from_list else slot  # int32 as prompt_buffer_slots gives them (strides kept), or int64
    prompt_state_write(st, kr, v, u, score, slot, empty, kpos=kpos, pad=pad, margin=margin, none_score=_NONE)
    for name, x in want.tensors().items():
        assert torch.equal(st.tensors()[name], x), name


def _first_members(keep: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """The specification of prompt_buffer_slots: keep [B, H, N] -> the first ``capacity`` members along N in their
    order, then the rest (a stable sort of the "not a member" flags): slot, empty [B, C, H] (past N: empty, slot 0)."""
    flags, idx = torch.sort(~keep, dim=-1, stable=True)
    short = capacity - keep.shape[-1]
    flags = torch.nn.functional.pad(flags, (0, max(0, short)), value=True)[..., :capacity]
    idx = torch.nn.functional.pad(idx, (0, max(0, short)))[..., :capacity].masked_fill(flags, 0)
    return idx.permute(0, 2, 1), flags.permute(0, 2, 1)


@pytest.mark.parametrize(("T", "C"), [(5, 24), (300, 12), (300, 7), (40, 40), (3000, 100)], ids=str)
@pytest.mark.parametrize("mode", ["members", "listed", "listed-padded"])
def test_prompt_buffer_slots_are_the_first_members(T, C, mode):
    """Members in entry order, the first C of them (the walk stops there), then empty slots: for the final buffer's
    flags (strided, [B, T, H]) and for the op's lists, whose members are the keys still in the buffer after the
    row's last query (and, with left padding, entered by then), 10% of the entries members. T >= 300 fills the buffer
    (at T = 3000 after about 1,000 entries: the walk of 256-entry steps stops early), the shorter cases do not."""
    torch.manual_seed(T + C)
    B, H, W = 2, 3, 16
    kpos = kend = pad = members = None
    if mode == "members":
        members = (torch.rand(B, H, T, device=DEVICE) < 0.1).permute(0, 2, 1)  # [B, T, H], strided
        keep = members.permute(0, 2, 1)
    else:
        kpos = torch.randint(0, T + 1, (B, H, T), device=DEVICE, dtype=torch.int32)
        gone = torch.rand(B, H, T, device=DEVICE) < 0.9  # 10% of the entries still in the buffer at T - 1
        kend = torch.where(gone, torch.randint(0, T, (B, H, T), device=DEVICE), T).to(torch.int32)
        last = torch.full((B, 1, 1), T - 1, device=DEVICE)
        if mode == "listed-padded":
            pad = torch.tensor([0, min(3, T - 1)], device=DEVICE)
            last = last - pad[:, None, None]
        keep = (kend > last) & ((kpos <= last - W) if pad is not None else True)
    slot, empty = prompt_buffer_slots(T, C, members=members, kpos=kpos, kend=kend, window_size=W, pad=pad)
    want_slot, want_empty = _first_members(keep, C)
    assert torch.equal(empty, want_empty)
    assert torch.equal(slot.long(), want_slot)
    full, some = bool((~empty).all()), bool((~empty).any())
    assert full == (T >= 300) and (some or T == 5), (full, some)


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
    kinds = dict(score="fp32", win_score="fp32", buf_score="fp32", buf_pos="i64", pad="i64", slot="i32", empty="i1",
                 kpos="i32")
    sig = {p: "constexpr" if p in consts else "i32" if p in ints else "fp32" if p == "none_score" else
           "*" + kinds.get(p, dt) for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if sig[p].startswith("*")}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 2 if D <= 64 else 4})
    print(dt, D, "shared", kernel.metadata.shared)
fn = prefill._eviction_buffer_slots_kernel
params = list(inspect.signature(fn.fn).parameters)
for mode, BN in ((0, 1024), (1, 4096), (2, 4096), (2, 2048)):
    consts = dict(H=16, C=512, BN=BN, BC=512, MODE=mode, **({} if mode == 1 else {"pad": None}))
    consts.update({"kend": None} if mode == 2 else {})
    kinds = dict(src="i1" if mode == 2 else "i32", kend="i32", pad="i64", slot="i32", empty="i1")
    sig = {p: "constexpr" if p in consts else "*" + kinds[p] if p in kinds else "i32" for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if sig[p].startswith("*")}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 8 if BN >= 4096 else 4})
    print("slots", mode, BN, "shared", kernel.metadata.shared)
"""


@pytest.mark.slow
def test_prompt_state_kernel_compiles_for_sm90(compile_in_child):
    """The state kernel compiles for sm_90 at the launcher's settings (bf16 and float32, D = 64 to 256, from the
    listed keys or from positions, with and without padding), and the slots kernel in its three modes and step
    sizes (1,024 to 4,096 entries). In a child process: the tests' TRITON_INTERPRET=1 makes every kernel an
    interpreted one."""
    out = compile_in_child(_SM90_PROMPT_STATE)
    assert out.count("shared") == 7, out


def test_prompt_state_write_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    # where Triton compiles for a GPU, CPU tensors cannot reach the kernel: a clear error before the launch
    import mixerzoo.kernels.eviction.prefill as prefill

    monkeypatch.setattr(prefill, "interpreting", lambda: False)
    m = registry.build("eviction_swa", hidden_size=48, num_heads=4, num_kv_heads=2, window_size=16, capacity=24)
    st = m.init_state(1)
    x = torch.zeros(1, 3, 2, 12)
    with pytest.raises(RuntimeError, match="prompt_state_write: a Triton kernel; kr is on cpu"):
        prompt_state_write(st, x, x, torch.zeros(1, 3, 2, 24), torch.zeros(1, 3, 2), torch.zeros(1, 24, 2).long(),
                           torch.zeros(1, 24, 2).bool(), kpos=None, pad=None, margin=2, none_score=_NONE)  # fmt: skip
