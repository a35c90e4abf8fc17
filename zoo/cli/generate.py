"""`zoo generate NAME_OR_DIR [--set KEY=VALUE ...] --prompt TEXT [--temperature T --top-k K --top-p P ...]`."""

from __future__ import annotations

from zoo.cli import UsageError, add_load_args
from zoo.data import checkpoint_tokenizer
from zoo.io.checkpoint import load
from zoo.kernels import prepare_inference
from zoo.runs import resolve_checkpoint


def add_parser(sub):
    p = sub.add_parser("generate", help="sample a continuation of a prompt, streamed to stdout")
    add_load_args(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                   help="tokens to sample after the prompt (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="softmax temperature; 0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: random)")
    return p


def run(args) -> int:
    import sys

    import torch

    if args.max_new_tokens < 1 or args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1):
        raise UsageError("zoo generate: need --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1")
    ckpt = resolve_checkpoint(args.run)
    model = prepare_inference(load(ckpt, overrides=args.overrides).freeze().eval())
    tok = checkpoint_tokenizer(ckpt, model.recipe)
    ids = tok.encode(args.prompt)
    if not ids:
        raise UsageError("zoo generate: --prompt is empty")
    ids = ids[-(model.config.max_seq_len - 1):]
    gen = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    decode = tok.stream_decoder()
    sys.stdout.write(args.prompt)
    for nxt in model.generate(torch.tensor([ids]), args.max_new_tokens, args.temperature, args.top_k, args.top_p, gen):
        sys.stdout.write(decode([int(nxt[0, 0])]))
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
