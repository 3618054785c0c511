"""The attention kernels' tile tables (mixerzoo/kernels/_tile_table.py; swa's and eviction's): the shipped files are
valid and every rule one the launchers can run, lookups take the first matching rule, malformed files are errors
that name the file and the rule, and the launchers ask their table with the head dim, group and window of the
call."""

import json
import os

import pytest
import torch

from mixerzoo.kernels.eviction import attention as ev
from mixerzoo.kernels.eviction.reference import eviction_attention_ref
from mixerzoo.kernels.eviction.tuned import EVICTION_TABLE
from mixerzoo.kernels.swa import swa
from mixerzoo.kernels.swa.reference import swa_fwd_ref
from mixerzoo.kernels.swa.tuned import SWA_TABLE

TABLES = {"swa": SWA_TABLE, "eviction": EVICTION_TABLE}
# the launchers' questions run where the kernels run: CPU tensors in Triton's interpreter, CUDA tensors where Triton
# compiles for the GPU (the compiled kernels cannot read CPU tensors); there float32 dots take tf32
DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"
TOL = dict(atol=2e-5, rtol=2e-5) if DEV == "cpu" else dict(atol=5e-3, rtol=5e-3)


def _rule(kernel="fwd", D=128, G=(1, 1), W=(1, 384), **cfg):
    cfg = {"BM": 64, "BN": 32, "num_warps": 4, "num_stages": 3, **cfg}
    return dict(kernel=kernel, D=D, G=list(G), W=list(W), config=cfg)


@pytest.mark.parametrize("op", list(TABLES))
def test_shipped_tables_are_valid(op):
    table = TABLES[op]
    if not table.default_file.exists():
        assert op != "swa", "the measured H100 / H200 rules of swa ship with the package"
        pytest.skip(f"no {op} tile table measured yet: the defaults serve every shape")
    rules = table.load(table.default_file).get("sm90", [])
    assert rules
    for r in rules:
        c = r["config"]
        assert r["D"] in swa._SUPPORTED_D, r
        assert c["num_warps"] in (1, 2, 4, 8, 16) and c["num_stages"] >= 1, r
        if op == "swa":  # fwd / dq hold BM queries and step BN keys; dK/dV holds BN keys and steps BM queries
            assert (c["BN"] % c["BM"] == 0) if r["kernel"] == "dkdv" else (c["BM"] % c["BN"] == 0), r
            stash = c.get("STASH", False)
            assert not stash or r["kernel"] == "dq", r  # STASH is a dQ rule's key (swa_bwd reads it there only)
            regs = {"fwd": "QREGS", "dkdv": "KVREGS", "dq": None if stash else "QREGS"}[r["kernel"]]
            swa._loop_flags({k: v for k, v in c.items() if k != "STASH"}, "test", regs)  # keys the launchers accept
            if stash:
                _check_stash_rule(table, r)
    # no two rules of one kernel and head dim overlap: the first match would hide the second
    for a in rules:
        for b in rules:
            if a is not b and a["kernel"] == b["kernel"] and a["D"] == b["D"]:
                assert not all(a[x][0] <= b[x][1] and b[x][0] <= a[x][1] for x in ("G", "W")), (a, b)


def _check_stash_rule(table, r):
    """A STASH dq rule's tiles must fit the dK/dV tiles of every call it serves (the launcher refuses others): the
    dK/dV rule (or the head dim's default) at both ends of the rule's G and W ranges and at every dK/dV rule's
    bounds inside them."""
    Gs, Ws = set(r["G"]), set(r["W"])
    for d in table.load(table.default_file)["sm90"]:
        if d["kernel"] == "dkdv" and d["D"] == r["D"]:
            Gs |= {g for g in d["G"] if r["G"][0] <= g <= r["G"][1]}
            Ws |= {w for w in d["W"] if r["W"][0] <= w <= r["W"][1]}
    for G in Gs:
        for W in Ws:
            dkdv = table.lookup(str(table.default_file), "sm90", "dkdv", r["D"], G, W) or swa._dkdv_config(r["D"])
            c = r["config"]
            swa._check_stash_tiles(c["BM"], c["BN"], {"TMA": c.get("TMA", False)}, dkdv["BM"], dkdv["BN"])


def test_lookup_first_match_and_bounds(tmp_path):
    path = str(tmp_path / "t.json")
    wide = _rule(G=(1, 64), W=(1, 1 << 30), BM=128)
    doc = {"sm90": [_rule(G=(2, 8), W=(385, 1536)), wide], "sm80": [_rule(BM=32)]}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    look = SWA_TABLE.lookup
    assert look(path, "sm90", "fwd", 128, 2, 385)["BM"] == 64  # bounds inclusive
    assert look(path, "sm90", "fwd", 128, 8, 1536)["BM"] == 64
    assert look(path, "sm90", "fwd", 128, 9, 1536)["BM"] == 128  # G past the first rule: the next
    assert look(path, "sm90", "fwd", 128, 1, 100)["BM"] == 128
    assert look(path, "sm90", "dq", 128, 1, 100) is None  # no rule for the kernel
    assert look(path, "sm90", "fwd", 64, 1, 100) is None  # nor for the head dim
    assert look(path, "sm80", "fwd", 128, 1, 100)["BM"] == 32  # per compute capability
    assert look(path, "sm100", "fwd", 128, 1, 100) is None
    look(path, "sm90", "fwd", 128, 1, 100)["BM"] = 0  # a copy: the cached rule is not changed
    assert look(path, "sm90", "fwd", 128, 1, 100)["BM"] == 128


def test_no_table_for_float32_or_cpu():
    for table in TABLES.values():
        assert table.config("fwd", torch.device("cpu"), torch.bfloat16, 128, 1, 512) is None
        if torch.cuda.is_available():
            assert table.config("fwd", torch.device("cuda"), torch.float32, 128, 1, 512) is None


@pytest.mark.parametrize(
    "doc, message",
    [
        ("[1, 2]", "expected an object keyed by compute capability"),
        ('{"sm90": {}}', "'sm90' must be a list of rules"),
        ('{"sm90": [{"kernel": "bwd"}]}', "rule 0 of 'sm90': 'kernel' must be one of"),
        (json.dumps({"sm90": [{**_rule(), "D": "128"}]}), "'D' must be an int, got '128'"),
        (json.dumps({"sm90": [_rule(G=(8, 2))]}), "'G' must be [lo, hi] with lo <= hi, got [8, 2]"),
        (json.dumps({"sm90": [{**_rule(), "config": {"BM": 64}}]}), "'config' must hold BM, BN, num_warps"),
        (json.dumps({"sm90": [_rule(), {**_rule(), "config": {**_rule()["config"], "BK": 1}}]}), "rule 1 of"),
        ("{not json", "cannot read it as JSON"),
        (
            json.dumps({"sm90": [_rule(maxnreg=300)]}),
            "'maxnreg' (registers per thread, a limit for ptxas) must be an int from 32 to 255, got 300",
        ),
        (json.dumps({"sm90": [_rule(maxnreg=True)]}), "'maxnreg' (registers per thread, a limit for ptxas) must be"),
    ],
)
def test_malformed_tables_are_errors(tmp_path, doc, message):
    path = tmp_path / "bad.json"
    path.write_text(doc)
    with pytest.raises(ValueError, match="swa tile table .*bad.json") as e:
        SWA_TABLE.load(path)
    assert message in str(e.value)


def test_eviction_rules_take_its_own_keys(tmp_path):
    path = tmp_path / "ev.json"
    rule = dict(kernel="listed", D=64, G=[1, 1], W=[1, 9], config=dict(BT=64, BS=64, SPLIT=False, num_warps=4,
                                                                       num_stages=2))  # fmt: skip
    path.write_text(json.dumps({"sm90": [rule]}))
    assert EVICTION_TABLE.load(path)["sm90"][0]["config"]["BT"] == 64
    rule["config"]["maxnreg"] = 168  # a cap on the registers per thread, a key of both tables
    path.write_text(json.dumps({"sm90": [rule]}))
    assert EVICTION_TABLE.load(path)["sm90"][0]["config"]["maxnreg"] == 168
    path.write_text(json.dumps({"sm90": [_rule(kernel="dq")]}))  # swa's keys
    with pytest.raises(ValueError, match="eviction tile table .*'config' must hold BT, BS, num_warps, num_stages"):
        EVICTION_TABLE.load(path)


def test_missing_table_named_by_the_variable_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=f"{SWA_TABLE.env}=.*nope.json: no such file"):
        SWA_TABLE.table(str(tmp_path / "nope.json"))
    # only the package's own file may be absent (a GPU nobody measured): no rules, the defaults
    monkeypatch.setattr(SWA_TABLE, "default_file", tmp_path / "tuned_configs.json")
    assert SWA_TABLE.table(str(tmp_path / "tuned_configs.json")) == {}


def test_swa_launchers_ask_the_table(monkeypatch):
    # the forward and both backward kernels look up (kernel, D, G, W clamped to T); the table's config is the one
    # launched (a small interpreter tile here), and the result is unchanged
    asked = []

    def fake(kernel, device, dtype, D, G, W):
        asked.append((kernel, D, G, W))
        BM, BN = (16, 32) if kernel == "dkdv" else (32, 16)
        return dict(BM=BM, BN=BN, num_warps=4, num_stages=1)

    monkeypatch.setattr(swa, "tuned_config", fake)
    torch.manual_seed(0)
    B, T, HQ, HKV, D, W = 1, 40, 4, 2, 32, 100  # W past T: clamped to 40
    q = torch.randn(B, T, HQ, D, device=DEV)
    k, v = torch.randn(B, T, HKV, D, device=DEV), torch.randn(B, T, HKV, D, device=DEV)
    o, lse = swa.swa_fwd(q, k, v, W)
    swa.swa_bwd(torch.randn_like(q), q, k, v, o, lse, W)
    assert asked == [("fwd", D, 2, 40), ("dkdv", D, 2, 40), ("dq", D, 2, 40)]
    o_ref, _ = swa_fwd_ref(q, k, v, W, 0, D**-0.5, None)
    torch.testing.assert_close(o, o_ref.to(o.dtype), **TOL)
    # a config given by the caller wins over the table: no lookup
    asked.clear()
    swa.swa_fwd(q, k, v, W, config=dict(BM=64, BN=32, num_warps=4, num_stages=1))
    assert asked == []


@pytest.mark.parametrize("D, looked_up", [(16, 16), (40, 64)])
def test_eviction_launchers_ask_the_table(monkeypatch, D, looked_up):
    # each of the four kernels looks up (kernel, D, G, W), a head dim between powers of 2 as the next one (as swa's
    # launchers do); a rule's tiles (here other small ones: 32-row blocks, one masked loop) are launched, and the
    # results still match the reference
    asked = []

    def fake(kernel, device, dtype, D, G, W):
        asked.append((kernel, D, G, W))
        return {**ev.default_tiles(torch.empty(0), kernel), "BT": 32, "SPLIT": False}

    monkeypatch.setattr(EVICTION_TABLE, "config", fake)
    torch.manual_seed(1)
    B, T, HQ, HKV, W = 1, 70, 4, 2, 9
    q = torch.randn(B, T, HQ, D, device=DEV)
    k, v = torch.randn(B, T, HKV, D, device=DEV), torch.randn(B, T, HKV, D, device=DEV)
    score = torch.randn(B, T, HKV, device=DEV)
    kw = dict(window_size=W, capacity=8, num_sinks=2, training=True)
    lists = ev.eviction_intervals(score, **kw)
    o, lse = ev.eviction_attention_fwd(q, k, v, *lists, window_size=W, scale=D**-0.5, open_ended=True)
    ev.eviction_attention_bwd(torch.randn_like(q), q, k, v, o, lse, *lists, window_size=W, scale=D**-0.5,
                              open_ended=True)  # fmt: skip
    assert asked == [(kernel, looked_up, 2, W) for kernel in ("fwd", "dq", "dkdv", "listed")]
    o_ref, _ = eviction_attention_ref(q, k, v, score, **kw)
    torch.testing.assert_close(o, o_ref.to(o.dtype), **TOL)
