"""``python -m mixerzoo eval``: score a model (a preset or config, with trained weights) from the shell."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

__all__ = ["add_eval_parser", "load_model"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    *,
    preset: str | None = None,
    config: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """A HybridLM in eval mode from a preset name or a config JSON file (``HybridLMConfig.to_dict()``),
    with ``weights`` loaded when given: a safetensors file or a torch file holding a state dict (or a dict
    with the state dict under "model")."""
    from ..models import HybridLM, HybridLMConfig

    if (preset is None) == (config is None):
        raise ValueError("eval: give exactly one of --preset and --config")
    if preset is not None:
        cfg = HybridLMConfig.from_preset(preset)
    else:
        with open(config) as f:
            cfg = HybridLMConfig.from_dict(json.load(f))
    model = HybridLM.from_config(cfg)
    if weights is not None:
        if os.fspath(weights).endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(os.fspath(weights))
        else:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
            sd = sd.get("model", sd) if isinstance(sd, dict) else sd
        model.load_state_dict(sd)
    return model.to(device=device, dtype=dtype).eval()


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand (``ppl``, ``needle``, ``harness``) to a subparsers object."""
    p = sub.add_parser("eval", help="score a model: perplexity, needle retrieval, lm-evaluation-harness tasks")
    tasks = p.add_subparsers(dest="eval_task", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--preset", default=None, help="a HybridLMConfig preset (e.g. lte-0.4b)")
        q.add_argument("--config", default=None, help="a JSON file of HybridLMConfig.to_dict()")
        q.add_argument("--weights", default=None, help="trained weights: .safetensors or a torch state-dict file")
        q.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        q.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
        q.add_argument("--out", default=None, help="also write the JSON result to this file")
        q.set_defaults(func=_cmd_eval)

    q = tasks.add_parser("ppl", help="perplexity on a flat binary file of token ids")
    common(q)
    q.add_argument("--tokens", required=True, help="flat binary token file (native byte order)")
    q.add_argument("--token-dtype", default="uint16", choices=["uint16", "int32", "uint32", "int64"])
    q.add_argument("--seq-len", type=int, default=2048)
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--max-windows", type=int, default=None)

    q = tasks.add_parser("needle", help="single-needle retrieval on synthetic, seeded token sequences")
    common(q)
    q.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="comma-separated sequence lengths")
    q.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated needle depths in [0, 1]")
    q.add_argument("--trials", type=int, default=4)
    q.add_argument("--key-len", type=int, default=8)
    q.add_argument("--value-len", type=int, default=8)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--generate", action="store_true", help="prefill + decode instead of one teacher-forced forward")

    q = tasks.add_parser("harness", help="lm-evaluation-harness tasks (needs: pip install lm-eval transformers)")
    common(q)
    q.add_argument("--tasks", required=True, help="comma-separated task names, e.g. lambada_openai,hellaswag")
    q.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer name or path")
    q.add_argument("--num-fewshot", type=int, default=None)
    q.add_argument("--limit", type=float, default=None)
    q.add_argument("--max-length", type=int, default=4096)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .harness import run_lm_eval
    from .needle import needle_retrieval
    from .perplexity import perplexity, read_tokens

    try:
        model = load_model(
            preset=args.preset, config=args.config, weights=args.weights, device=args.device, dtype=_DTYPES[args.dtype]
        )
        if args.eval_task == "ppl":
            result = perplexity(
                model,
                read_tokens(args.tokens, args.token_dtype),
                seq_len=args.seq_len,
                batch_size=args.batch,
                max_windows=args.max_windows,
            )
        elif args.eval_task == "needle":
            result = needle_retrieval(
                model,
                lengths=[int(v) for v in args.lengths.split(",")],
                depths=[float(v) for v in args.depths.split(",")],
                trials=args.trials,
                key_len=args.key_len,
                value_len=args.value_len,
                seed=args.seed,
                generate=args.generate,
            )
        else:
            limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
            result = run_lm_eval(
                model,
                args.tokenizer,
                args.tasks.split(","),
                num_fewshot=args.num_fewshot,
                limit=limit,
                max_length=args.max_length,
            )["results"]
    except (ValueError, KeyError, ImportError, OSError) as e:
        print(f"{args.prog} eval: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0
