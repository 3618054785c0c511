"""Module layout: the models build on the registry, never the reverse."""

import os
import subprocess
import sys
import textwrap

import pytest

import mixerzoo
from mixerzoo import models, registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The package's __init__ imports everything; a bare package object stands in for it, so that only what
# mixerzoo.registry itself imports gets loaded.
_CHECK = textwrap.dedent(
    """
    import importlib.util, sys, types

    spec = importlib.util.find_spec("mixerzoo")
    pkg = types.ModuleType("mixerzoo")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["mixerzoo"] = pkg

    import mixerzoo.registry as registry
    import mixerzoo.mixers.swa  # registers swa; a mixer needs the registry, not the models

    registry.names()
    loaded = sorted(m for m in sys.modules if m.startswith("mixerzoo.models"))
    assert not loaded, f"importing mixerzoo.registry loaded {loaded}"
    stack = registry.build_stack("swa", hidden_size=16, num_heads=2)  # imports the models on first use
    assert type(stack).__module__ == "mixerzoo.models.hybrid", type(stack)
    print("ok")
    """
)


@pytest.mark.slow  # a fresh interpreter: torch's import alone takes seconds
def test_registry_does_not_import_models():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


def test_build_stack_entry_points_agree():
    kwargs = dict(hidden_size=16, num_heads=2, window_size=4)
    stacks = [f("gdn swa", **kwargs) for f in (registry.build_stack, mixerzoo.build_stack, models.build_stack)]
    stacks.append(models.HybridStack.from_pattern("gdn swa", **kwargs))
    for s in stacks:
        assert isinstance(s, models.HybridStack) and s.pattern == "gdn swa"
        assert [(m.name, m.config) for m in s.mixers] == [(m.name, m.config) for m in stacks[0].mixers]
