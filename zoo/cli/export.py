"""`zoo export hf ZOO_DIR OUT`: write a zoo checkpoint as a Hugging Face model folder."""

from __future__ import annotations

from zoo.cli import UsageError
from zoo.io.hf import export_hf


def add_parser(sub):
    p = sub.add_parser("export", help="write a zoo checkpoint in another format (Hugging Face)")
    fmt = p.add_subparsers(dest="format", metavar="FORMAT", parser_class=type(p))
    hf = fmt.add_parser("hf", help="a Hugging Face folder that transformers loads (dense llama/mistral/qwen2, mixtral)")
    hf.add_argument("src", metavar="ZOO_DIR", help="zoo checkpoint folder, or a run folder (its newest checkpoint)")
    hf.add_argument("out", metavar="OUT", help="new folder to write (must not exist)")
    hf.add_argument("--arch", default=None, help="model_type to write (default: chosen from the recipe)")
    p.set_defaults(format=None)
    return p


def run(args) -> int:
    if args.format is None:
        raise UsageError("zoo export: name a format, hf (see zoo export --help)")

    print(f"wrote {export_hf(args.src, args.out, arch=args.arch)}")
    return 0
