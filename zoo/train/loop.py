"""The training loop: `train(recipe, out)` runs `[train]` with `[optim]` on `[data]` into run folder `out`.

The run folder's format: zoo/runs.py.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from zoo.data import load_data, val_batches
from zoo.data.tokens import Windows
from zoo.errors import CheckpointError, RecipeError, ZooError
from zoo.eval.evaluate import sparsity_summary
from zoo.eval.perplexity import autocast, decode_ms, eval_loss, perplexity
from zoo.files import write_atomic
from zoo.io.checkpoint import load
from zoo.kernels import prepare_inference
from zoo.model.accounting import account
from zoo.model.build import build
from zoo.model.memory import allocator_failure, check_training_fits
from zoo.recipe.recipe import Recipe, load_recipe
from zoo.registry import get_registry
from zoo.runs import METRICS, RECIPE, SUMMARY, prepare_out, resolve_checkpoint, step_dirs
from zoo.schema import errors_located, flatten, recipe_changes
from zoo.train.distill import kl_loss, load_teacher
from zoo.train.parallel import check_launch, setup
from zoo.train.state import TrainState, load_train_state, save_checkpoint


class TrainingDiverged(ZooError):
    """The loss or the gradient became NaN or infinite."""


def copy_weights(model, path: str | Path, what: str) -> Path:
    """Load the tensors of checkpoint (or run folder) `path` into `model`: names and shapes must match."""
    ckpt = resolve_checkpoint(path)
    src = load(ckpt).state_dict()
    dst = model.state_dict()
    for name in sorted(set(dst) | set(src)):
        if name not in src or name not in dst:
            where = "is missing from" if name not in src else "is not in this recipe but in"
            raise CheckpointError(f"{what} {ckpt}: tensor {name!r} {where} the checkpoint; only recipes with the "
                                  "same tensors can continue from it (sparsity may differ, shapes may not)")
        if src[name].shape != dst[name].shape:
            raise CheckpointError(f"{what} {ckpt}: tensor {name!r} is {tuple(src[name].shape)} there, "
                                  f"{tuple(dst[name].shape)} in this recipe")
    model.load_state_dict(src)
    return ckpt


def may_change_on_resume(key: str) -> bool:
    """The recipe keys a resumed run may change."""
    return key == "train.steps" or key.startswith("parallel.")


def _record_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a killed process counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """metrics.jsonl (and TensorBoard when asked): one line per record, flushed as written."""

    def __init__(self, out: Path, keep_until: int | None, tensorboard: bool, active: bool = True):
        self.path, self.active = out / METRICS, active
        if not active:  # a rank other than 0 of a distributed run
            return
        if keep_until is not None and self.path.exists():  # a resumed run rewrites what came after it
            lines = self.path.read_text(encoding="utf-8").splitlines()
            kept = [ln for ln in lines if _record_step(ln) <= keep_until]
            write_atomic(self.path, "".join(ln + "\n" for ln in kept))
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = summary_writer()(str(out / "tensorboard")) if tensorboard else None

    def write(self, record: dict) -> None:
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in flatten(record).items():
                if isinstance(value, (int, float)) and key not in ("step", "tokens"):
                    self.tb.add_scalar(f"{record['split']}/{key}", value, record["step"])

    def close(self) -> None:
        if not self.active:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def summary_writer() -> type:
    """TensorBoard's SummaryWriter; ZooError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ZooError("train.tensorboard = true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def first_forward(model: torch.nn.Module, x: torch.Tensor, precision: str, device: torch.device) -> None:
    """One forward pass of one validation row, without gradients or a change to the random state:
    a block or kernel that cannot run on `device` (e.g. the triton backend on a CPU) fails here."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
            autocast(precision, device):
        model(x.to(device))


def train(recipe: Recipe, out: str | Path, *, resume: bool = False, stop_at: int | None = None,
          progress: bool = True) -> dict:
    """Train `recipe` into run folder `out`; return the summary (or the state when stopped at `stop_at`)."""
    with errors_located(recipe.source, recipe.origins):
        check_seq_len(recipe)
        par = setup(recipe)
        try:  # refused before the run folder is touched when the estimate exceeds the free memory
            check_training_fits(build(recipe, device="meta"), recipe, par.device, par.world, par.strategy)
            return _train(recipe, out, par, resume, stop_at, progress)
        except (RuntimeError, MemoryError) as err:
            oom = allocator_failure(err, f"{recipe.source or 'recipe'}: training")
            if oom is None:
                raise
            raise oom from None
        finally:
            par.close()


def check_seq_len(recipe: Recipe) -> None:
    if recipe.train.seq_len > recipe.model.max_seq_len:
        raise RecipeError(f"{recipe.train.seq_len} exceeds model.max_seq_len = {recipe.model.max_seq_len}",
                          file=recipe.source or None, path="train.seq_len")


def check_ranks(recipe: Recipe, ranks: int, out: str | Path, resume: bool) -> None:
    """What train() on each of `ranks` processes would refuse before opening the run folder `out`, checked
    in one process (`zoo train --nproc-per-node` asks before it starts the ranks)."""
    with errors_located(recipe.source, recipe.origins):
        check_seq_len(recipe)
        device, _ = check_launch(recipe, ranks, ranks - 1)  # the last rank: the one a GPU count refuses
        check_training_fits(build(recipe, device="meta"), recipe, device, ranks, recipe.parallel.strategy)
    resume_point(recipe, Path(out), resume)


def resume_point(recipe: Recipe, out: Path, resume: bool) -> Path | None:
    """The checkpoint in run folder `out` that training continues from (None: step 0); an error when `out`
    holds a run and not `resume`, or `resume` and nothing to resume or another recipe."""
    if not resume:
        if step_dirs(out) or (out / METRICS).exists():
            raise ZooError(f"--out {out} already holds a run: pass --resume to continue it, or choose another "
                           "folder")
        return None
    found = step_dirs(out)
    if not found and not (out / RECIPE).is_file():
        raise CheckpointError(f"--resume: {out} has no checkpoints/step-N to resume from")
    change = recipe_changes(load_recipe(out / RECIPE).to_dict(), recipe.to_dict(), may_change_on_resume)
    if change:
        raise ZooError(f"--resume: the recipe differs from the one {out} was trained with ({change[0]}); "
                       "only train.steps and [parallel] may change")
    return found[-1] if found else None


def _train(recipe: Recipe, out: str | Path, par, resume: bool, stop_at: int | None, progress: bool) -> dict:
    cfg = recipe.train
    out = Path(out)
    state, restart = TrainState(), False
    # Everything that can fail at start-up is checked before the run folder is written to, so that a
    # failed start leaves nothing that a retry would have to --resume or delete.
    ckpt = resume_point(recipe, out, resume)
    if resume and ckpt is None:  # stopped before its first checkpoint was complete: start over, in the same folder
        warnings.warn(f"--resume: {out} has no complete checkpoint yet; training from step 0", stacklevel=2)
        resume, restart = False, True
    if cfg.tensorboard:
        summary_writer()

    data = load_data(recipe)
    torch.manual_seed(cfg.seed)
    model = build(recipe)
    if cfg.init_from and not resume:
        copy_weights(model, cfg.init_from, "train.init_from")
    if resume:
        copy_weights(model, ckpt, "--resume")
    val = list(val_batches(data.val, cfg.seq_len, cfg.batch_size, cfg.eval_batches))
    first_forward(model.to(par.device), val[0][0][:1], cfg.precision, par.device)  # on this rank, before wrap
    teacher = load_teacher(cfg.distill, model, par.device) if cfg.distill else None
    fwd = par.wrap(model)
    registry = get_registry()
    opt = registry.build(recipe.optim, model.parameters(), file=recipe.source or None)
    for g in opt.param_groups:
        g["peak_lr"], g["peak_wd"] = g["lr"], g["weight_decay"]
    schedule = registry.build(cfg.schedule, cfg.steps, file=recipe.source or None)
    if resume:
        state = load_train_state(ckpt, par.optimizer_loader(opt))

    par.barrier()  # every rank has looked at the folder before rank 0 writes to it
    out = prepare_out(out)
    if par.main and not resume:
        write_atomic(out / RECIPE, recipe.to_toml())

    micro = cfg.batch_size // cfg.grad_accum
    windows = Windows(data.train, cfg.seq_len, cfg.seed)
    sparsity_inputs = [x for x, _ in val[:2]]
    fwd = torch.compile(fwd) if cfg.compile else fwd
    log = MetricsLog(out, state.step if resume or restart else None, cfg.tensorboard, active=par.main)
    tok_json = data.tokenizer.to_json()
    params = [p for p in model.parameters() if p.requires_grad]
    last = stop_at if stop_at is not None else cfg.steps
    bar = tqdm(total=cfg.steps, initial=state.step, desc=recipe.name or "train", unit="step",
               disable=not (progress and par.main), file=sys.stderr, dynamic_ncols=True)
    window = {"loss": 0.0, "n": 0, "aux": {}, "time": 0.0, "tokens": 0}
    val_loss = None
    model.train()
    try:
        while state.step < last:
            t0 = time.perf_counter()
            lr_f, wd_f = schedule(state.step)
            for g in opt.param_groups:
                g["lr"], g["weight_decay"] = g["peak_lr"] * lr_f, g["peak_wd"] * wd_f
            loss_sum, aux_sum = 0.0, {}
            for _ in range(cfg.grad_accum):
                x, y = (par.shard(t).to(par.device) for t in windows.batch(state.samples, micro))
                state.samples += micro
                with autocast(cfg.precision, par.device):
                    o = fwd(x, y)
                    if teacher is not None:
                        with torch.no_grad():
                            target = teacher(x).logits
                        o.aux_losses["distill"] = cfg.distill.weight * kl_loss(o.logits, target,
                                                                              cfg.distill.temperature)
                (o.total_loss / cfg.grad_accum).backward()
                loss_sum += float(o.loss.detach()) / cfg.grad_accum
                for k, v in o.aux_losses.items():
                    aux_sum[k] = aux_sum.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            par.reduce_gradients(params)
            loss_sum, aux_sum = par.mean({"loss": loss_sum}).pop("loss"), par.mean(aux_sum)
            layer_norms = [par.grad_norm(list(b.parameters())) for b in model.blocks] if cfg.layer_grad_norms else None
            gnorm = par.clip_grad_norm(params, cfg.grad_clip or float("inf"))
            if not (math.isfinite(loss_sum) and math.isfinite(gnorm)):
                what = f"loss {loss_sum}" if not math.isfinite(loss_sum) else f"gradient norm {gnorm}"
                kept = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was written yet"
                raise TrainingDiverged(f"training stopped at step {state.step + 1}: {what}; {kept}. "
                                       "Try a lower optim.lr, a longer warm-up or train.grad_clip")
            opt.step()
            opt.zero_grad(set_to_none=True)
            state.step += 1
            step_tokens = cfg.batch_size * cfg.seq_len
            state.tokens += step_tokens
            dt = time.perf_counter() - t0
            state.elapsed += dt
            window["loss"] += loss_sum
            window["n"] += 1
            window["time"] += dt
            window["tokens"] += step_tokens
            for k, v in aux_sum.items():
                window["aux"][k] = window["aux"].get(k, 0.0) + v
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{step_tokens / dt:.0f}",
                            **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))
            done = state.step == cfg.steps
            if state.step % cfg.log_every == 0 or done or state.step == last:
                n = window["n"]
                record = {"split": "train", "step": state.step, "tokens": state.tokens, "loss": window["loss"] / n,
                          "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm,
                          "tokens_per_s": window["tokens"] / max(window["time"], 1e-9), "elapsed": state.elapsed}
                if window["aux"]:
                    record["aux"] = {k: v / n for k, v in window["aux"].items()}
                if layer_norms is not None:
                    record["layer_grad_norms"] = layer_norms
                log.write(record)
                window = {"loss": 0.0, "n": 0, "aux": {}, "time": 0.0, "tokens": 0}
            if (cfg.eval_every and state.step % cfg.eval_every == 0) or done:
                val_loss = eval_loss(model, val, cfg.precision)
                record = {"split": "val", "step": state.step, "tokens": state.tokens, "val_loss": val_loss,
                          "val_ppl": perplexity(val_loss), "sparsity": sparsity_summary(model, sparsity_inputs)}
                log.write(record)
            if (cfg.ckpt_every and state.step % cfg.ckpt_every == 0) or done or state.step == last:
                # every rank takes part in gathering the shards
                weights, optim_state = par.full_state_dict(model), par.optimizer_state(opt)
                if par.main:
                    ckpt = save_checkpoint(out, model, optim_state, state, tok_json, cfg.keep_last, weights=weights)
    finally:
        bar.close()
        log.close()
    if state.step < cfg.steps:
        return {"step": state.step, "checkpoint": str(ckpt)}
    if par.main:  # a sharded model cannot run forward on one rank alone: the summary measures the checkpoint
        write_summary(out, recipe, load(ckpt) if par.sharded else model, data, state, val, ckpt)
    par.barrier()
    return json.loads((out / SUMMARY).read_text(encoding="utf-8"))


def write_summary(out: Path, recipe: Recipe, model, data, state: TrainState, val, ckpt: Path) -> dict:
    """summary.json: the final figures of a finished run, as `zoo compare` reads them. Decode speed is
    that of the inference form `zoo generate` runs: the checkpoint frozen and prepared, its layers eager."""
    records = [json.loads(ln) for ln in (out / METRICS).read_text(encoding="utf-8").splitlines() if ln.strip()]
    train_rec = [r for r in records if r["split"] == "train"]
    val_rec = [r for r in records if r["split"] == "val"]
    prompt = val[0][0][:1, : max(1, recipe.train.seq_len // 2)]
    acc = account(model, seq_len=recipe.train.seq_len)
    decode = decode_ms(prepare_inference(load(ckpt, device=next(model.parameters()).device).freeze().eval()), prompt,
                       compile=False)  # a few dozen tokens would not pay back compiling the layer steps
    summary = {
        "name": recipe.name,
        "steps": state.step,
        "tokens": state.tokens,
        "train_loss": train_rec[-1]["loss"],
        "val_loss": val_rec[-1]["val_loss"],
        "val_ppl": val_rec[-1]["val_ppl"],
        "sparsity": val_rec[-1].get("sparsity"),
        "train_tokens_per_s": state.tokens / max(state.elapsed, 1e-9),
        "decode_tokens_per_s": 1e3 / decode["ms_per_token"],
        "decode": decode,
        "accounting": acc.to_dict(),
        "tokenizer": data.tokenizer.fingerprint,
    }
    write_atomic(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary
