"""`zoo export hf ZOO_DIR OUT` / `zoo export gguf ZOO_DIR OUT.gguf --type T`: a zoo checkpoint in another format."""

from __future__ import annotations

from zoo.cli import UsageError
from zoo.io.gguf_export import TYPES, export_gguf
from zoo.io.hf import export_hf


def add_parser(sub):
    p = sub.add_parser("export", help="write a zoo checkpoint in another format (Hugging Face, GGUF)")
    fmt = p.add_subparsers(dest="format", metavar="FORMAT", parser_class=type(p))
    hf = fmt.add_parser("hf", help="a Hugging Face folder that transformers loads (llama, mistral, qwen2, mixtral, "
                                   "qwen2_moe, olmoe, bitnet)")
    gg = fmt.add_parser("gguf", help="a GGUF file that llama.cpp runs (llama, qwen2, mixtral, qwen2moe, olmoe, "
                                     "bitnet)")
    for q, out in ((hf, "new folder to write"), (gg, "new .gguf file to write")):
        q.add_argument("src", metavar="ZOO_DIR", help="zoo checkpoint folder, or a run folder (its newest checkpoint)")
        q.add_argument("out", metavar="OUT", help=out)
        q.add_argument("--arch", default=None,
                       help="transformers model_type to write (default: chosen from the recipe)")
        q.add_argument("--drop-sparsity", action="store_true",
                       help="export a Q-Sparse model's dense weights (the file records that it was trained sparse)")
        q.add_argument("--force", action="store_true", help="replace OUT if it exists")
    gg.add_argument("--type", default="f16", metavar="TYPE",
                    help=f"storage of the weight matrices: {', '.join(TYPES)} (tq*: ternary BitNet projections; "
                         "default f16)")
    p.set_defaults(format=None)
    return p


def run(args) -> int:
    if args.format is None:
        raise UsageError("zoo export: name a format, hf or gguf (see zoo export --help)")
    options = dict(arch=args.arch, drop_sparsity=args.drop_sparsity, force=args.force)
    if args.format == "hf":
        out = export_hf(args.src, args.out, **options)
    else:
        out = export_gguf(args.src, args.out, type=args.type, **options)
    print(f"wrote {out}")
    return 0
