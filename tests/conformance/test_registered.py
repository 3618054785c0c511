"""Every registered mixer through every applicable conformance check, on every device present."""

import pytest
import torch

from mixerzoo import conformance, registry

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _cases():
    for name in registry.names():
        if name.startswith("_"):  # test-only mixers registered by other test modules
            continue
        for device in DEVICES:
            for check, dtype in conformance.plan(name, device):
                dt = str(dtype).removeprefix("torch.")
                # compiles take seconds, and so does the float32 gradients check's full float64 gradcheck (the
                # half-precision gradients checks stay in the fast run)
                slow = check.startswith("compile") or (check == "gradients" and dtype == torch.float32)
                marks = [pytest.mark.slow] if slow else []
                yield pytest.param(name, device, check, dtype, id=f"{name}-{device}-{check}-{dt}", marks=marks)


@pytest.mark.parametrize("name,device,check,dtype", list(_cases()))
def test_conformance(name, device, check, dtype):
    try:
        conformance.CHECKS[check](conformance.Case(registry.spec(name), device=device, dtype=dtype))
    except conformance.Skip as e:
        pytest.skip(str(e))


def test_builtin_mixers_registered():
    assert {"full_attention", "swa", "swa_sink", "gdn", "eviction_swa"} <= set(registry.names())
