"""`zoo convert hf SRC OUT` / `zoo convert gguf FILE OUT`: import a public model as a zoo checkpoint."""

from __future__ import annotations

from zoo.cli import UsageError
from zoo.io.gguf import convert_gguf
from zoo.io.hf import convert_hf


def add_parser(sub):
    p = sub.add_parser("convert", help="import a Hugging Face folder or a GGUF file as a zoo checkpoint")
    fmt = p.add_subparsers(dest="format", metavar="FORMAT", parser_class=type(p))
    hf = fmt.add_parser("hf", help="a Hugging Face model folder (config.json + safetensors)")
    hf.add_argument("src", metavar="SRC", help="folder with config.json and model.safetensors (or its index)")
    gg = fmt.add_parser("gguf", help="a llama-family GGUF file (dequantized to full precision)")
    gg.add_argument("src", metavar="FILE", help="the .gguf file")
    for q in (hf, gg):
        q.add_argument("out", metavar="OUT", help="zoo checkpoint folder to write")
        q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="parameter dtype of the zoo model (default: the source's, else float32)")
        q.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                       help="cap the context length (the KV cache is preallocated at this size)")
    p.set_defaults(format=None)
    return p


def run(args) -> int:
    if args.format is None:
        raise UsageError("zoo convert: name a format, hf or gguf (see zoo convert --help)")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise UsageError("zoo convert: --max-seq-len must be >= 1")
    convert = convert_hf if args.format == "hf" else convert_gguf
    out = convert(args.src, args.out, dtype=args.dtype, max_seq_len=args.max_seq_len)
    print(f"wrote {out}")
    return 0
