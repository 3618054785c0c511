"""A deliberate regression, to see ``python -m mixerzoo bench --compare`` catch one: imported with ``--import``, it
makes swa's attention op run twice per call (the second result is returned, so outputs stay correct).

    python -m mixerzoo bench --device cuda --mixers swa --no-anchors --import examples/regression_demo.py \\
        --compare benchmarks/results/nvidia-h200-bench.json        # exit status 1: the forward rows regressed
    python -m mixerzoo bench --device cuda --mixers swa --no-anchors \\
        --compare benchmarks/results/nvidia-h200-bench.json        # exit status 0 on an unchanged tree
"""

import mixerzoo.mixers.swa as swa_mixer

_op = swa_mixer.swa_attention


def _twice(*args, **kwargs):
    _op(*args, **kwargs)
    return _op(*args, **kwargs)


swa_mixer.swa_attention = _twice
