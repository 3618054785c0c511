"""The sliding-window kernels' tile table (``kernels/_tile_table.py``): rules for the forward (``fwd``), dK/dV
(``dkdv``) and dQ (``dq``) kernels, config keys BM, BN, num_warps, num_stages and optionally ONE_LOOP, TMA, QREGS
(forward and dq rules: Q, and dO, as register operands), KVREGS (dkdv rules: K and V so), STASH (dq rules: the stash
backward, whose dQ tile takes the dK/dV rule's BN) and maxnreg (a cap on the registers per thread,
``_tile_table.check_maxnreg``); data in ``tuned_configs.json`` beside this file, ``MIXERZOO_SWA_CONFIGS`` naming
another file."""

from __future__ import annotations

import pathlib

from .._tile_table import TileTable

__all__ = ["SWA_TABLE", "TABLE_ENV", "tuned_config", "load_table"]

SWA_TABLE = TileTable(
    "swa",
    pathlib.Path(__file__).with_name("tuned_configs.json"),
    "MIXERZOO_SWA_CONFIGS",
    kernels=("fwd", "dkdv", "dq"),
    required=("BM", "BN", "num_warps", "num_stages"),
    optional=("ONE_LOOP", "TMA", "QREGS", "KVREGS", "STASH", "maxnreg"),
)
TABLE_ENV = SWA_TABLE.env
tuned_config = SWA_TABLE.config
load_table = SWA_TABLE.load
