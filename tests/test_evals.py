"""mixerzoo.evals on tiny models on the CPU: perplexity on a token file, needle retrieval, the harness hook,
and ``python -m mixerzoo eval``."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mixerzoo.cli import main
from mixerzoo.evals import loglikelihood, needle_retrieval, perplexity, read_tokens, run_lm_eval
from mixerzoo.evals.needle import make_needle
from mixerzoo.models import HybridLM, HybridLMConfig


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return HybridLM.from_config(HybridLMConfig.from_preset("tiny", window_size=8)).eval()


def test_read_tokens(tmp_path):
    ids = torch.tensor([0, 1, 255, 40000, 65535])
    (tmp_path / "a.bin").write_bytes(ids.to(torch.uint16).numpy().tobytes())
    assert torch.equal(read_tokens(tmp_path / "a.bin"), ids)
    (tmp_path / "b.bin").write_bytes(ids.to(torch.int32).numpy().tobytes() + b"x")
    with pytest.raises(ValueError, match="not a multiple of 4"):
        read_tokens(tmp_path / "b.bin", "int32")


def test_perplexity_is_the_mean_loss_of_the_windows(lm):
    tokens = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(1))
    got = perplexity(lm, tokens, seq_len=24, batch_size=3)
    windows = tokens[:96].view(4, 24)
    with torch.no_grad():
        logits, _ = lm(windows)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
    assert got["windows"] == 4 and got["tokens"] == 4 * 23
    assert got["nll"] == pytest.approx(float(nll), rel=1e-5) and got["ppl"] == pytest.approx(math.exp(float(nll)))
    with pytest.raises(ValueError, match="token ids must lie in"):
        perplexity(lm, torch.full((50,), 300), seq_len=24)


def test_needle_sample_layout():
    gen = torch.Generator().manual_seed(0)
    prompt, value = make_needle(64, 0.5, key_len=3, value_len=2, low=10, high=20, generator=gen)
    assert prompt.numel() == 62 and value.numel() == 2
    key = prompt[-3:]
    at = [i for i in range(59) if torch.equal(prompt[i : i + 3], key)]
    assert any(torch.equal(prompt[i + 3 : i + 5], value) for i in at)


class _Copier(torch.nn.Module):
    """A 'model' that predicts, at each position, the token that followed the previous occurrence of the
    current token: it solves the needle task exactly (keys are unique with high probability)."""

    vocab_size = 1000

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids, states=None):
        B, T = ids.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            seen = {}
            for t in range(T - 1):
                seen[int(ids[b, t])] = int(ids[b, t + 1])
            for t in range(T):
                logits[b, t, seen.get(int(ids[b, t]), 0)] = 1.0
        return logits, states


def test_needle_retrieval_scores(lm):
    rows = needle_retrieval(_Copier(), lengths=[40], depths=[0.0, 1.0], trials=2, key_len=1, value_len=1)
    assert [r["accuracy"] for r in rows] == [1.0, 1.0]
    rows = needle_retrieval(lm, lengths=[48], depths=[0.5], trials=2, key_len=2, value_len=3, seed=3)
    assert rows[0]["accuracy"] == 0.0  # an untrained model does not retrieve
    same = needle_retrieval(lm, lengths=[48], depths=[0.5], trials=2, key_len=2, value_len=3, seed=3, generate=True)
    assert same[0]["token_accuracy"] == rows[0]["token_accuracy"]  # greedy decode == teacher-forced argmax here


def test_loglikelihood(lm):
    ll, greedy = loglikelihood(lm, [1, 2, 3], [4, 5])
    with torch.no_grad():
        logp = lm(torch.tensor([[1, 2, 3, 4]]))[0].log_softmax(-1)[0]
    assert ll == pytest.approx(float(logp[2, 4] + logp[3, 5]), rel=1e-5)
    assert greedy == bool(logp[2].argmax() == 4 and logp[3].argmax() == 5)


def test_harness_needs_lm_eval(lm):
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install lm-eval"):
            run_lm_eval(lm, None, ["lambada_openai"])
    else:
        pytest.skip("lm-eval is installed")


def test_cli_eval(tmp_path, capsys, lm):
    (tmp_path / "cfg.json").write_text(json.dumps(lm.config.to_dict()))
    torch.save(lm.state_dict(), tmp_path / "w.pt")
    tokens = torch.randint(0, 256, (80,), generator=torch.Generator().manual_seed(2)).to(torch.int32)
    (tmp_path / "t.bin").write_bytes(tokens.numpy().tobytes())
    args = ["eval", "ppl", "--config", str(tmp_path / "cfg.json"), "--weights", str(tmp_path / "w.pt")]
    assert main([*args, "--tokens", str(tmp_path / "t.bin"), "--token-dtype", "int32", "--seq-len", "20"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["ppl"] == pytest.approx(perplexity(lm, tokens.long(), seq_len=20)["ppl"], rel=1e-5)
    assert main(["eval", "needle", "--preset", "tiny", "--config", "x.json"]) == 2
    assert "exactly one of --preset and --config" in capsys.readouterr().err
