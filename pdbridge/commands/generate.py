"""`pdbridge generate`: run one monolithic engine on one prompt and print the tokens.

Without --model it runs the embedded default tiny hybrid model (pdbridge.model.default_model).
"""
from __future__ import annotations

import json
import os
import sys


def add_arguments(parser) -> None:
    parser.add_argument("--model", metavar="DIR", help="HF model directory (config.json + "
                        "*.safetensors); default: the embedded tiny hybrid model")
    parser.add_argument("--tp", type=int, default=1, metavar="T", help="tensor-parallel size")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="prompt text (needs a tokenizer)")
    src.add_argument("--prompt-ids", metavar="IDS", help="prompt token ids, e.g. 1,2,3")
    parser.add_argument("--max-tokens", type=int, default=16, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="F",
                        help="0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="F")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="0 (default): off")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="go on past the model's end-of-sequence token up to --max-tokens")
    parser.add_argument("--seed", type=int, default=None, metavar="S")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--num-blocks", type=int, default=None, metavar="N",
                        help="cache blocks (default: enough for this prompt)")
    parser.add_argument("--json", action="store_true",
                        help='print {"token_ids": [...], "text": ...}')


def run(args) -> int:
    error = _check(args)
    if error:
        print(f"pdbridge generate: {error}", file=sys.stderr)
        return 2
    from pdbridge.engine.llm_engine import Engine
    from pdbridge.engine.request import SamplingParams
    from pdbridge.spec import CacheConfig

    tokenizer = load_tokenizer(args.model)
    if args.prompt is not None and tokenizer is None:
        print(f"pdbridge generate: --prompt: {args.model} has no tokenizer; use --prompt-ids",
              file=sys.stderr)
        return 2
    ids = tokenizer.encode(args.prompt) if args.prompt is not None else _parse_ids(args.prompt_ids)
    try:
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                  ignore_eos=args.ignore_eos)
    except ValueError as e:
        print(f"pdbridge generate: {e}", file=sys.stderr)
        return 2
    blocks = args.num_blocks or (len(ids) + args.max_tokens) // 16 + 4
    error = _check_engine(args, CacheConfig(num_blocks=blocks))
    if error:
        print(f"pdbridge generate: {error}", file=sys.stderr)
        return 2
    with Engine(args.model, args.tp, CacheConfig(num_blocks=blocks), device=args.device) as engine:
        try:
            out = engine.generate([ids], sampling)[0]
        except ValueError as e:         # token ids outside the vocabulary, request too large
            print(f"pdbridge generate: {e}", file=sys.stderr)
            return 2
    from pdbridge.engine.request import FinishReason
    if out.finish_reason is FinishReason.NONFINITE:
        print(f"pdbridge generate: the model produced NaN/Inf logits after "
              f"{len(out.token_ids)} tokens (bad weights, or overflow in its dtype); "
              f"no token was sampled from them", file=sys.stderr)
        return 1
    text = tokenizer.decode(out.token_ids) if tokenizer is not None else None
    if args.json:
        print(json.dumps({"token_ids": out.token_ids, "text": text,
                          "finish_reason": out.finish_reason.value if out.finish_reason else None}))
    else:
        print(" ".join(map(str, out.token_ids)))
        if text is not None:
            print(text)
    return 0


def _check(args) -> str:
    if args.tp < 1:
        return f"--tp must be >= 1, got {args.tp}"
    if args.num_blocks is not None and args.num_blocks < 1:
        return f"--num-blocks must be >= 1 (or left out for enough for the prompt), got {args.num_blocks}"
    if args.max_tokens < 1:
        return f"--max-tokens must be >= 1, got {args.max_tokens}"
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        return f"--model {args.model!r}: no config.json there (want an HF model directory)"
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        return f"--device {args.device!r}; allowed: cpu, cuda"
    if args.prompt_ids is not None:
        try:
            ids = _parse_ids(args.prompt_ids)
        except ValueError:
            return f"--prompt-ids {args.prompt_ids!r}: want comma-separated integers, e.g. 1,2,3"
        if not ids:
            return "--prompt-ids: empty prompt"
    elif args.prompt == "":
        return "--prompt: empty prompt"
    return ""


def _check_engine(args, cache) -> str:
    """What would make the engine fail after its worker processes started, refused first."""
    from pdbridge.commands.preflight import check_device, check_model
    return check_device(args.device) or check_model(args.model, [("--tp", args.tp)], cache)


def _parse_ids(text: str) -> list[int]:
    return [int(t) for t in text.replace(" ", "").split(",") if t]


def load_tokenizer(model_dir: str | None):
    """The model directory's tokenizer.json (the default model's byte tokenizer when None),
    or None if it has none."""
    from pdbridge.serve.tokenizer import load
    return load(model_dir)
