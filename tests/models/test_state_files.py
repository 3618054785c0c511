"""Whole-model state files: bit-exact round trip, decoding continues identically, and clear refusals of files
made for another stack or damaged."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import mixerzoo
from mixerzoo.models import HybridLM, HybridLMConfig, HybridStack
from mixerzoo.models.state_files import FORMAT, read_metadata

ALL = "gdn swa_sink eviction_swa full_attention"
V = 61


def _lm(pattern=ALL, seed=0, **defaults):
    torch.manual_seed(seed)
    if "swa" in pattern:
        defaults.setdefault("window_size", 16)
    return HybridLM(V, pattern, hidden_size=32, num_heads=2, mlp_ratio=2.0, **defaults).eval()


def _prefilled(lm, B=2, T=9, max_seqlen=20):
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :3] = False  # a left-padded row: pad counters are part of the state
    states = lm.init_state(B, max_seqlen=max_seqlen)
    with torch.no_grad():
        logits, states = lm(ids, states, attention_mask=mask)
    return states, logits[:, -1].argmax(-1)


def _decode(lm, states, token, n):
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, states = lm(token[:, None], states)
            out.append(logits[:, -1])
            token = logits[:, -1].argmax(-1)
    return torch.stack(out, 1)


def test_round_trip_is_bit_exact_and_decoding_continues(tmp_path):
    lm = _lm()
    states, token = _prefilled(lm)
    path = tmp_path / "states.safetensors"
    lm.save_state(path, states)
    loaded = lm.load_state(path)
    assert [type(s) for s in loaded] == [type(s) for s in states]
    for i, (a, b) in enumerate(zip(states, loaded, strict=True)):
        for k, t in a.tensors().items():
            u = getattr(b, k)
            assert u.dtype == t.dtype and u.shape == t.shape and torch.equal(u, t), (i, k)
    # both copies decode the same logits, bit for bit
    assert torch.equal(_decode(lm, states, token, 5), _decode(lm, loaded, token, 5))

    meta = read_metadata(path)
    assert meta["format"] == FORMAT and meta["mixerzoo_version"] == mixerzoo.__version__
    assert meta["pattern"] == ALL and meta["num_layers"] == "4"
    assert [meta[f"layers.{i}.mixer"] for i in range(4)] == ALL.split()
    assert json.loads(meta["layers.1.config"])["window_size"] == 16
    assert meta["layers.3.state_class"] == type(states[3]).__name__
    assert HybridLMConfig.from_dict(json.loads(meta["model_config"])) == lm.config
    assert set(load_file(path)) == {f"layers.{i}.{k}" for i, s in enumerate(states) for k in s.tensors()}


def test_stack_methods_and_device(tmp_path):
    stack = _lm("gdn swa").stack
    assert isinstance(stack, HybridStack)
    states = stack.init_state(1)
    with torch.no_grad():
        stack(torch.randn(1, 5, 32), states)
    stack.save_state(tmp_path / "s.safetensors", states)
    loaded = stack.load_state(tmp_path / "s.safetensors", device="cpu")
    assert all(
        torch.equal(a.tensors()[k], b.tensors()[k]) for a, b in zip(states, loaded, strict=True) for k in a.tensors()
    )
    assert "model_config" not in read_metadata(tmp_path / "s.safetensors")


def test_file_from_another_stack_is_refused(tmp_path):
    lm = _lm("gdn swa")
    path = tmp_path / "s.safetensors"
    lm.save_state(path, lm.init_state(2))
    with pytest.raises(ValueError, match=r"another stack: layer 0 is 'gdn' in the file, 'swa' here .*'gdn swa'"):
        _lm("swa gdn").load_state(path)
    with pytest.raises(ValueError, match=r"the file has 2 layers, this stack 3 \(layer 2 \(gdn\) is not in the file\)"):
        _lm("gdn swa gdn").load_state(path)
    with pytest.raises(ValueError, match=r"the file has 2 layers, this stack 1"):
        _lm("gdn").load_state(path)
    with pytest.raises(ValueError, match=r"layer 1 \(swa\): config field window_size is 16 in the file, 8 here"):
        _lm("gdn swa", window_size=8).load_state(path)
    with pytest.raises(ValueError, match=r"layer 0 \(gdn\): config field conv_size is 4 in the file, 3 here"):
        _lm("gdn[conv_size=3] swa").load_state(path)
    # the same layers spelled another way load
    assert len(_lm("gdn*1 swa").load_state(path)) == 2


def _rewrite(path, out, *, tensors=None, metadata=None):
    t = load_file(path)
    m = read_metadata(path)
    if tensors is not None:
        tensors(t)
    if metadata is not None:
        metadata(m)
    save_file(t, out, metadata=m)
    return out


def test_damaged_or_edited_files_are_refused(tmp_path):
    lm = _lm("gdn swa full_attention")
    states, _ = _prefilled(lm)
    path = tmp_path / "s.safetensors"
    lm.save_state(path, states)
    data = path.read_bytes()

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 64])
    with pytest.raises(ValueError, match=r"cut.safetensors is not a readable safetensors file|reading the tensors"):
        lm.load_state(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors file"):
        lm.load_state(junk)
    with pytest.raises(FileNotFoundError):
        lm.load_state(tmp_path / "missing.safetensors")

    def edit(name, **kw):
        return _rewrite(path, tmp_path / name, **kw)

    cases = [
        (dict(metadata=lambda m: m.pop("format")), "is not a mixerzoo state file"),
        (dict(metadata=lambda m: m.pop("layers.1.config")), "metadata 'layers.1.config' is missing"),
        (dict(metadata=lambda m: m.update({"layers.1.config": "{oops"})), "'layers.1.config' is not JSON"),
        (dict(metadata=lambda m: m.update({"num_layers": "x"})), "'num_layers' is 'x', not an int"),
        (dict(metadata=lambda m: m.update({"layers.2.state_class": "Other"})), "state class is Other in the file"),
        (
            dict(tensors=lambda t: t["layers.0.S"].view(-1)[3].fill_(float("nan"))),
            r"layer 0 \(gdn\): GDNState: field 'S' holds NaN or Inf",
        ),
        (dict(tensors=lambda t: t["layers.1.seen"].fill_(-4)), r"layer 1 \(swa\): .*'seen' must be >= 0, got -4"),
        (dict(tensors=lambda t: t.pop("layers.1.pad")), r"layer 1 \(swa\): .*fields do not match; missing \['pad'\]"),
        (dict(tensors=lambda t: t.update({"layers.7.x": torch.zeros(1)})), r"unexpected tensor 'layers.7.x'"),
        (
            dict(tensors=lambda t: t.update({"layers.0.S": t["layers.0.S"][:, :1].clone()})),
            r"layer 0 \(gdn\): state field 'S' has shape \(2, 1, 16, 16\), this mixer's config needs \(2, 2, 16, 16\)",
        ),
        (
            dict(tensors=lambda t: t.update({"layers.2.pad": t["layers.2.pad"][:1].clone()})),
            r"layer 2 \(full_attention\): FullAttentionState: field",
        ),
    ]
    for i, (kw, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            lm.load_state(edit(f"e{i}.safetensors", **kw))


def test_save_refuses_states_of_another_stack(tmp_path):
    lm = _lm("gdn swa")
    other = _lm("swa gdn")
    with pytest.raises(ValueError, match="states must be the list of 2 states from init_state, got 1 states"):
        lm.save_state(tmp_path / "x", lm.init_state(1)[:1])
    with pytest.raises(TypeError, match=r"layer 0 \(gdn\) needs a GDNState, got SWAState"):
        lm.save_state(tmp_path / "x", other.init_state(1))
    with pytest.raises(ValueError, match=r"layer 1 \(swa\): state field 'k_cache' has shape"):
        lm.save_state(tmp_path / "x", [lm.init_state(1)[0], _lm("swa", window_size=4).init_state(1)[0]])
    assert not (tmp_path / "x").exists()


def test_state_loads_under_another_backend(tmp_path):
    """The backend chooses how attention is computed, not what the state holds: a state saved from an sdpa
    full_attention stack loads into a flex one, and a missing backend field in the file is no mismatch."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from mixerzoo.models import HybridLM

    lm = HybridLM(64, "full_attention swa", hidden_size=32, num_heads=2, window_size=4).eval()
    states = lm.init_state(1, max_seqlen=16)
    path = tmp_path / "s.safetensors"
    lm.save_state(path, states)
    other = HybridLM(64, "full_attention[backend=flex] swa", hidden_size=32, num_heads=2, window_size=4).eval()
    other.load_state(path)
    # the same file without the field (as written before the field existed) loads too
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["layers.1.config"])
    cfg.pop("backend", None)
    meta["layers.1.config"] = json.dumps(cfg, sort_keys=True)
    save_file(tensors, tmp_path / "old.safetensors", metadata=meta)
    lm.load_state(tmp_path / "old.safetensors")
