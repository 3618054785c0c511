"""backend="flash_attn" of full_attention, swa and swa_sink: flash-attn 4 (flash_attn.cute), else flash-attn 2.

On the CPU: the errors at construction (neither package, flash-attn 2 alone for sinks, a broken install, head dims,
no GPU) with the imports monkeypatched. On a GPU with flash-attn installed: outputs and gradients in bf16 / fp16
against the float32 Triton or SDPA path of the same weights, GQA, left and right padding, non-finite inputs, a
prefill + decode through the state, and float32 input refused.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pathlib
import subprocess
import sys
import types
import zipfile

import pytest
import torch

from mixerzoo import registry
from mixerzoo.baselines import backends
from mixerzoo.testing import assert_close

MIXERS = ["full_attention", "swa", "swa_sink"]
NEITHER = r"needs flash-attn 4 \(module flash_attn\.cute\) or flash-attn 2 \(module flash_attn\), and neither"


def build(name: str, backend: str | None = "flash_attn", hidden: int = 64, heads: int = 4, **kw):
    if name != "full_attention":
        kw.setdefault("window_size", 8)
    if backend is not None:
        kw["backend"] = backend
    return registry.build(name, hidden_size=hidden, num_heads=heads, **kw)


def fake_flash_attn_2() -> types.ModuleType:
    """A module standing in for an installed flash-attn 2 (construction only reads its attributes)."""
    fa = types.ModuleType("flash_attn")
    fa.flash_attn_func = fa.flash_attn_varlen_func = lambda *a, **k: None
    return fa


def fake_flash_attn_4() -> tuple[types.ModuleType, types.ModuleType]:
    """Modules standing in for an installed flash-attn 4: the namespace package flash_attn and flash_attn.cute."""
    fa = types.ModuleType("flash_attn")
    fa.__path__ = []
    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = cute.flash_attn_varlen_func = lambda *a, **k: None
    fa.cute = cute
    return fa, cute


# -- on every machine ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MIXERS)
def test_neither_installed_names_both_packages(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn -> ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
    with pytest.raises(ImportError, match=NEITHER) as e:
        build(name)
    msg = str(e.value)
    assert msg.startswith(f"{name}: backend 'flash_attn'")
    assert "pip install flash-attn-4" in msg and "pip install flash-attn --no-build-isolation" in msg
    instead = "backend='sdpa' (or 'flex')" if name == "full_attention" else "backend='triton'"
    assert msg.endswith(f"or use {instead}")
    assert ("not enough for attention sinks" in msg) == (name == "swa_sink")  # its default num_sinks is 4


def test_sinks_refuse_flash_attn_2_alone(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn_2())
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
    with pytest.raises(ImportError, match=r"swa_sink: backend 'flash_attn' with attention sinks needs flash-attn") as e:
        build("swa_sink", num_sinks=2)
    assert "only flash-attn 2 is installed" in str(e.value) and "pip install flash-attn-4" in str(e.value)
    assert "backend='triton'" in str(e.value)
    # Without sinks flash-attn 2 is enough: construction goes on to the device check.
    if not torch.cuda.is_available():
        for name, kw in [("swa_sink", {"num_sinks": 0}), ("swa", {}), ("full_attention", {})]:
            with pytest.raises(RuntimeError, match=rf"{name}: backend 'flash_attn' runs on NVIDIA GPUs only"):
                build(name, **kw)


def test_broken_flash_attn_4_is_reported_not_skipped(monkeypatch):
    """An installed flash-attn 4 whose dependencies do not import fails loudly instead of falling back to 2."""
    real = importlib.import_module

    def import_module(name, package=None):
        if name == "flash_attn.cute":
            raise ModuleNotFoundError("No module named 'cutlass'", name="cutlass")
        return real(name, package)

    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn_2())
    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(ImportError, match=r"flash-attn 4 \(flash_attn.cute\) is installed but does not import") as e:
        build("swa")
    assert "No module named 'cutlass'" in str(e.value) and "pip install flash-attn-4" in str(e.value)


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("hidden,heads,dim", [(40, 4, 10), (72, 1, 72 * 4)], ids=["D10", "D288"])
def test_head_dim_outside_flash_attn(monkeypatch, name, hidden, heads, dim):
    fa, cute = fake_flash_attn_4()
    monkeypatch.setitem(sys.modules, "flash_attn", fa)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    with pytest.raises(ValueError, match=rf"{name}: backend 'flash_attn' takes head_dim a multiple of 8 in \[8, 256\]"):
        build(name, hidden=hidden, heads=heads, head_dim=dim)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
@pytest.mark.parametrize("name", MIXERS)
def test_flash_attn_4_without_gpu(monkeypatch, name):
    fa, cute = fake_flash_attn_4()
    monkeypatch.setitem(sys.modules, "flash_attn", fa)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    other = "backend='sdpa' (or 'flex')" if name == "full_attention" else "backend='triton'"
    with pytest.raises(RuntimeError, match=rf"{name}: backend 'flash_attn' runs on NVIDIA GPUs only") as e:
        build(name)
    assert other in str(e.value)


@pytest.mark.parametrize("name", ["swa", "swa_sink"])
def test_swa_backend_field(name):
    spec = registry.spec(name)
    assert spec.backends == ("triton", "flash_attn")
    docs = {field: (default, meaning) for field, default, meaning in spec.field_docs()}
    assert docs["backend"][0] == "'triton'" and docs["backend"][1].startswith('parallel-form kernel: "triton"')
    assert build(name, backend=None).config.backend == "triton"
    with pytest.raises(ValueError, match=rf"{name}: backend must be one of 'triton', 'flash_attn', got 'sdpa'"):
        build(name, backend="sdpa")
    with pytest.raises(ValueError, match=rf"{name}: backend must be one of 'triton', 'flash_attn', got None"):
        registry.build(name, hidden_size=64, num_heads=4, backend=None)


# -- on a GPU with flash-attn ----------------------------------------------------------------------

needs_flash_attn = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="needs a CUDA GPU and flash-attn (pip install flash-attn-4, or flash-attn)",
)

BF16, FP16 = torch.bfloat16, torch.float16
# (mixer, config, hidden, heads, dtype): head dims 64 and 128, MHA and GQA, windows shorter than T, sinks past them.
# Few cases: flash-attn 4 compiles a kernel for each head dim, GQA ratio, mask kind and dtype on first use.
GPU_CASES = [
    pytest.param("full_attention", dict(num_kv_heads=2), 512, 8, BF16, id="full-D64-gqa4-bf16"),
    pytest.param("full_attention", dict(), 512, 4, FP16, id="full-D128-mha-fp16"),
    pytest.param("swa", dict(window_size=64), 512, 8, BF16, id="swa-W64-D64-mha-bf16"),
    pytest.param("swa", dict(window_size=100, num_kv_heads=2), 512, 4, BF16, id="swa-W100-D128-gqa2-bf16"),
    pytest.param("swa", dict(window_size=1, num_kv_heads=2), 512, 8, BF16, id="swa-W1-D64-gqa4-bf16"),
    pytest.param("swa_sink", dict(window_size=64, num_sinks=4, num_kv_heads=2), 512, 8, BF16, id="sink-W64-S4-bf16"),
    pytest.param("swa_sink", dict(window_size=37, num_sinks=3), 512, 4, FP16, id="sink-W37-S3-D128-fp16"),
    pytest.param("swa_sink", dict(window_size=2000, num_sinks=4), 512, 8, BF16, id="sink-W-past-T-bf16"),
]


def pair(name: str, cfg: dict, hidden: int, heads: int, dtype: torch.dtype):
    """(flash_attn mixer in dtype, the same weights in float32 on the default backend) on CUDA."""
    torch.manual_seed(0)
    ref = build(name, backend=None, hidden=hidden, heads=heads, **cfg).cuda()
    fa = build(name, hidden=hidden, heads=heads, **cfg).cuda()
    fa.load_state_dict(ref.state_dict())
    return fa.to(dtype), ref


def padded(B: int, T: int, hidden: int, dtype: torch.dtype):
    """x [B, T, hidden] in dtype and a mask with left padding (row 1), right padding (row 2) and both (row 3)."""
    torch.manual_seed(1)
    x = torch.randn(B, T, hidden, device="cuda").to(dtype)
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    mask[1, :23] = False
    mask[2, T - 41 :] = False
    mask[3, :5] = False
    mask[3, T - 9 :] = False
    return x, mask


@needs_flash_attn
@pytest.mark.gpu
@pytest.mark.parametrize("padding", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("name,cfg,hidden,heads,dtype", GPU_CASES)
def test_forward_and_gradients_match_float32(name, cfg, hidden, heads, dtype, padding):
    if name == "swa_sink" and importlib.util.find_spec("flash_attn.cute") is None:
        pytest.skip("sinks need flash-attn 4")
    fa, ref = pair(name, cfg, hidden, heads, dtype)
    x, mask = padded(4, 333, hidden, dtype)
    mask = mask if padding else None
    keep = torch.ones_like(x[..., 0], dtype=torch.bool) if mask is None else mask
    x_ref = x.float().requires_grad_()
    y_ref, _ = ref(x_ref, attention_mask=mask)
    x_fa = x.clone().requires_grad_()
    y_fa, _ = fa(x_fa, attention_mask=mask)
    assert y_fa.dtype == dtype
    what = f"{name} {cfg} {dtype} padding={padding}"
    assert_close(f"{what} out", y_ref[keep], y_fa.float()[keep], dtype)
    if mask is not None:
        assert bool((y_fa[~mask] == 0).all()), f"{what}: padding outputs must be 0"
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y_fa.backward(dy.to(dtype))
    assert_close(f"{what} dx", x_ref.grad[keep], x_fa.grad.float()[keep], dtype, grad=True)
    for (n, p_ref), (_, p_fa) in zip(ref.named_parameters(), fa.named_parameters(), strict=True):
        assert_close(f"{what} d{n}", p_ref.grad, p_fa.grad.float(), dtype, grad=True)


@needs_flash_attn
@pytest.mark.gpu
def test_flash_attn_4_is_preferred():
    four = importlib.util.find_spec("flash_attn.cute") is not None
    for name in MIXERS:
        flash = build(name, hidden=128, heads=2, **({"num_sinks": 0} if name == "swa_sink" else {})).flash_attn
        print(name, flash.name)
        assert flash.version == (4 if four else 2), flash.name
        assert build(name, backend=None).flash_attn is None


@needs_flash_attn
@pytest.mark.gpu
@pytest.mark.parametrize(
    "name,cfg",
    [("full_attention", dict(num_kv_heads=2)), ("swa", dict(window_size=16)), ("swa_sink", dict(window_size=16))],
    ids=["full", "swa", "sink"],
)
@torch.no_grad()
def test_non_finite_reaches_exactly_what_the_default_backend_reaches(name, cfg):
    if name == "swa_sink" and importlib.util.find_spec("flash_attn.cute") is None:
        pytest.skip("sinks need flash-attn 4")
    fa, ref = pair(name, cfg, 512, 8, torch.bfloat16)
    ref = ref.to(torch.bfloat16)
    x, mask = padded(4, 200, 512, torch.bfloat16)
    for t0 in (2, 50, 150):
        for bad in (float("nan"), float("inf")):
            x_bad = x.clone()
            x_bad[:, t0] = bad
            y_ref, _ = ref(x_bad, attention_mask=mask)
            y_fa, _ = fa(x_bad, attention_mask=mask)
            nan_ref, nan_fa = y_ref.isnan().any(-1), y_fa.isnan().any(-1)  # [B, T]
            assert torch.equal(nan_ref, nan_fa), f"{name}: {bad} at {t0} reaches other tokens than on the default"
            assert not nan_fa[:, :t0].any(), f"{name}: {bad} at {t0} reaches earlier tokens"
            ok = ~nan_ref
            assert_close(f"{name} {bad} at {t0}, outputs it does not reach", y_ref[ok], y_fa[ok], torch.bfloat16)


@needs_flash_attn
@pytest.mark.gpu
@pytest.mark.parametrize("name", MIXERS)
@torch.no_grad()
def test_prefill_and_decode_continue_the_flash_parallel_form(name):
    if name == "swa_sink" and importlib.util.find_spec("flash_attn.cute") is None:
        pytest.skip("sinks need flash-attn 4")
    cfg = {} if name == "full_attention" else dict(window_size=32)
    fa, _ = pair(name, cfg, 256, 4, torch.bfloat16)
    x, mask = padded(4, 120, 256, torch.bfloat16)
    y, _ = fa(x, attention_mask=mask)
    state = fa.init_state(4, max_seqlen=120)
    ys = [fa(x[:, :70], state, attention_mask=mask[:, :70])[0]]
    ys += [fa(x[:, t : t + 1], state, attention_mask=mask[:, t : t + 1])[0] for t in range(70, 120)]
    assert_close(f"{name}: prefill + decode vs flash parallel", y[mask], torch.cat(ys, 1)[mask], torch.bfloat16)


@needs_flash_attn
@pytest.mark.gpu
@pytest.mark.parametrize("name", MIXERS)
def test_float32_input_is_refused(name):
    m = build(name, hidden=128, heads=2, **({} if name != "swa_sink" else {"num_sinks": 0})).cuda()
    with pytest.raises(RuntimeError, match=rf"{name}: backend 'flash_attn' takes torch.float16, torch.bfloat16"):
        m(torch.randn(1, 10, 128, device="cuda"))


def test_flash_attn_module_exports():
    assert {"FlashAttn", "load_flash_attn"} <= set(backends.__all__)


# -- benchmarks/install_wheels.sh: flash-attn 4 from small wheels and split parts ------------------------


def _wheel(folder, name: str, files: dict[str, str]) -> None:
    """A minimal pure-Python wheel ``name``-1.0 holding ``files`` in ``folder``."""
    dist = f"{name}-1.0.dist-info"
    files = {
        **files,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{dist}/RECORD"])
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as z:
        for f, text in files.items():
            z.writestr(f, text)


@pytest.mark.slow  # runs the install script on built wheels
def test_install_wheels_joins_the_parts(tmp_path):
    _wheel(tmp_path / ".whl/fa4/small", "fa4_standin", {"fa4_standin/__init__.py": "X = 4\n"})
    tree = tmp_path / "tree"
    (tree / "nvidia_cutlass_dsl/dsl_packages/dsl_standin").mkdir(parents=True)
    (tree / "nvidia_cutlass_dsl/dsl_packages/dsl_standin/__init__.py").write_text("Y = 13\n")
    archive = subprocess.run(
        "tar -cf - nvidia_cutlass_dsl | xz -1", shell=True, cwd=tree, capture_output=True, check=True
    ).stdout
    (tmp_path / "stage").mkdir()
    half = len(archive) // 2
    (tmp_path / "stage/cu13.tar.xz.part-aa").write_bytes(archive[:half])  # the part carried by an earlier call
    (tmp_path / ".whl/fa4/cu13.tar.xz.part-ab").write_bytes(archive[half:])
    (tmp_path / ".whl/fa4/cu13.sha256").write_text(hashlib.sha256(archive).hexdigest() + "  cu13.tar.xz\n")
    script = pathlib.Path(__file__).resolve().parents[2] / "benchmarks/install_wheels.sh"
    site = tmp_path / "site"

    def install(parts: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "FA4_PARTS": parts}
        return subprocess.run(
            ["bash", str(script), str(site)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )

    p = install("stage .whl/fa4")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0].startswith(f"export PYTHONPATH={site}:{site}/nvidia_cutlass_dsl/dsl_packages")
    check = subprocess.run(
        ["bash", "-c", p.stdout + "python3 -c 'import fa4_standin, dsl_standin; print(fa4_standin.X, dsl_standin.Y)'"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.stdout.strip() == "4 13", check.stderr
    p = install(".whl/fa4")  # part-aa missing: flash-attn 4 is left out, not half installed
    assert p.returncode == 0, p.stderr
    assert "flash-attn 4 skipped: the parts cu13.tar.xz.part-ab do not make the archive" in p.stderr
    assert "dsl_packages" not in p.stdout
