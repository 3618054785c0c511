"""Every Triton kernel under mixerzoo/kernels has a name of its own that says which op it belongs to: profiler
traces show kernels by name only (docs/kernels.md)."""

import importlib
import pkgutil
from collections import defaultdict

import pytest

pytest.importorskip("triton")

import mixerzoo.kernels as kernels_pkg  # noqa: E402

# a kernel in kernels/<op>/ is named _<op>_..._kernel; the gdn folder also holds the causal_conv1d op
_EXTRA_PREFIXES = {"gdn": ("causal_conv1d_",)}


def _kernels():
    """(module, function name) of every @triton.jit object named ``*_kernel``."""
    for info in pkgutil.walk_packages(kernels_pkg.__path__, kernels_pkg.__name__ + "."):
        module = importlib.import_module(info.name)
        for attr, obj in vars(module).items():
            fn = getattr(obj, "fn", None)  # a JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1
            if attr.endswith("_kernel") and callable(fn) and fn.__module__ == module.__name__:
                yield module.__name__, fn.__name__


def test_kernel_names_are_unique_and_name_their_op():
    found = list(_kernels())
    assert len(found) >= 20, f"expected the swa, eviction and gdn kernels, found {found}"
    where = defaultdict(list)
    for module, name in found:
        where[name].append(module)
    clashes = {name: mods for name, mods in where.items() if len(mods) > 1}
    assert not clashes, f"kernel names used by more than one module: {clashes}"
    unnamed = []
    for module, name in found:
        parts = module.split(".")
        if len(parts) < 4:  # a module at the package root belongs to no op folder
            continue
        op = parts[2]
        if not name.lstrip("_").startswith((f"{op}_", *_EXTRA_PREFIXES.get(op, ()))):
            unnamed.append(f"{module}.{name}")
    assert not unnamed, f"kernels whose name does not start with their op's: {unnamed}"


def test_launch_arithmetic_matches_triton():
    # the launchers' plain-Python cdiv and next_pow2 give Triton's own results (without its per-call host cost)
    triton = pytest.importorskip("triton")
    from mixerzoo.kernels._triton import cdiv, next_pow2

    for n in range(0, 1100):
        assert next_pow2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 128):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
