"""The eviction attention kernels' tile table (``kernels/_tile_table.py``): rules for the forward (``fwd``), dQ
(``dq``), dK/dV window pass (``dkdv``) and listed-key pass (``listed``), config keys BT, BS, num_warps, num_stages
and optionally BC, SPLIT, BLOCKS_FIRST, WINDOW_FIRST, RECHECK (as in ``attention.CUDA_TILES``), QREGS (fwd and dq:
Q, and dO, as register operands), KVREGS (dkdv and listed: K and V so) and maxnreg (a cap on the registers per
thread, ``_tile_table.check_maxnreg``); data in ``tuned_configs.json`` beside this file when the project has
measured one, ``MIXERZOO_EVICTION_CONFIGS`` naming another file."""

from __future__ import annotations

import pathlib

from .._tile_table import TileTable

__all__ = ["EVICTION_TABLE"]

EVICTION_TABLE = TileTable(
    "eviction",
    pathlib.Path(__file__).with_name("tuned_configs.json"),
    "MIXERZOO_EVICTION_CONFIGS",
    kernels=("fwd", "dq", "dkdv", "listed"),
    required=("BT", "BS", "num_warps", "num_stages"),
    optional=("BC", "SPLIT", "BLOCKS_FIRST", "WINDOW_FIRST", "RECHECK", "QREGS", "KVREGS", "maxnreg"),
)
