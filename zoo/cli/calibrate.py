"""`zoo calibrate NAME_OR_DIR --sparsity S --out DIR`: a training-free sparse model with TEAL-style thresholds."""

from __future__ import annotations

from zoo.cli import UsageError, add_load_args
from zoo.data import build_corpus, checkpoint_tokenizer, split_tokens, token_file, val_batches
from zoo.data.corpus import Files, FilesConfig
from zoo.errors import CheckpointError
from zoo.eval.calibrate import calibrate
from zoo.io.checkpoint import load
from zoo.io.hf import TOKENIZER, save_converted
from zoo.model.build import build
from zoo.runs import resolve_checkpoint


def add_parser(sub):
    p = sub.add_parser("calibrate", help="training-free sparsity: per-projection magnitude thresholds calibrated "
                                         "on text to a target sparsity, saved as a new checkpoint")
    add_load_args(p)
    p.add_argument("--sparsity", type=float, required=True, metavar="S",
                   help="target fraction of zeros at every projection input (0 < S < 1), e.g. 0.5")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to write")
    p.add_argument("--inputs-only", action="store_true",
                   help="threshold the projection inputs only, not also a GLU's activation (after the SiLU)")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="calibration text files or folders (default: the recipe's training split)")
    p.add_argument("--batches", type=int, default=8, metavar="N", help="calibration batches (default 8)")
    return p


def run(args) -> int:
    if not 0 < args.sparsity < 1 or args.batches < 1:
        raise UsageError("zoo calibrate: need 0 < --sparsity < 1 and --batches >= 1")
    ckpt = resolve_checkpoint(args.run)
    base = load(ckpt, overrides=args.overrides)
    keep = round(1 - args.sparsity, 6)
    spec = {"kind": "threshold", "keep": keep}
    sites = {"model.sparsity": spec}
    if base.recipe.model.ffn.kind == "glu" and not args.inputs_only:
        sites["model.ffn.act_sparsity"] = spec
    recipe = base.recipe.replace(**sites)
    model = build(recipe)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(not name.endswith(".threshold") for name in missing):
        raise CheckpointError(f"{ckpt}: its tensors do not fit the thresholded recipe "
                              f"({(unexpected or missing)[0]!r})")
    del base  # its weights are copied into `model`: one copy in memory while calibrating
    tok = checkpoint_tokenizer(ckpt, recipe)
    cfg = recipe.train
    if args.data:
        tokens = token_file(Files(FilesConfig(paths=tuple(args.data)), key="--data"), tok)
    else:
        tokens = split_tokens(build_corpus(recipe), tok, recipe.data.val_fraction)[0]
    seq_len = min(cfg.seq_len, recipe.model.max_seq_len)
    batches = list(val_batches(tokens, seq_len, cfg.batch_size, args.batches))
    thresholds = calibrate(model, batches, cfg.precision)
    tolerance = max(tol for _, tol in thresholds.values())
    files = {name: (ckpt / name).read_bytes() for name in (TOKENIZER, "tokenizer_config.json")
             if (ckpt / name).is_file()}
    info = {"format": "zoo", "path": str(ckpt), "calibration": {
        "method": "threshold", "sparsity": args.sparsity, "sites": sorted(sites), "batches": len(batches),
        "tokens": sum(x.numel() for x, _ in batches), "data": args.data or "the recipe's training split",
        "tolerance": tolerance}}
    out = save_converted(model, args.out, files, info)
    print(f"calibrated {len(thresholds)} thresholds to sparsity {args.sparsity:g} (each within ±{tolerance:.2%} "
          f"on its calibration entries) on {info['calibration']['tokens']:,} tokens; wrote {out}")
    return 0
