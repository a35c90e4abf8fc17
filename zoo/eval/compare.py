"""`zoo compare`: finished runs and evaluation records side by side, seeds aggregated, plus the figure.

A row is one run, or the mean ± std of runs whose recipes differ only in `train.seed`, or one evaluation
record (`zoo eval ... --save DIR`: a model that is not a run folder, e.g. a catalogue model with a
training-free sparsity; records never group).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zoo.errors import ZooError
from zoo.eval.record import is_record, read_record
from zoo.recipe.recipe import load_recipe, recipe_from_dict
from zoo.runs import DECODE, EVALUATION, METRICS, RECIPE, SUMMARY, TASKS
from zoo.schema import BlockSpec, flatten, inline_toml, to_plain

METRIC_KEYS = ("total_params", "activated_params", "flops_per_token", "train_loss", "val_loss", "val_ppl",
               "sparsity", "train_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token", "tokens")
# not differences between runs: seeds group, the rest only changes what is logged
IGNORED = ("name", "train.seed", "train.layer_grad_norms", "train.tensorboard", "train.log_every")


@dataclass
class Run:
    """A finished run folder (its flattened recipe, summary.json, validation curve) or an evaluation record."""

    path: Path
    recipe: dict
    summary: dict  # summary.json, or a record's evaluation.json
    curve: list[tuple[int, float]] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    label: str = ""
    layer_grads: list[tuple[int, list[float]]] = field(default_factory=list)  # (step, norm per block)
    tasks: dict[str, float] = field(default_factory=dict)  # "task/metric" -> score, from tasks.json (zoo eval --tasks)
    decode: dict | None = None  # decode.json (zoo eval --decode), else the summary's; zoo.eval.perplexity.decode_ms
    record: bool = False  # an evaluation record, not a training run

    def metrics(self) -> dict[str, float | None]:
        s, acc = self.summary, self.summary["accounting"]
        measured = (s.get("sparsity") or {}).get("overall")
        ms = self.decode["ms_per_token"] if self.decode else None
        return {"total_params": acc["total_params"], "activated_params": acc["activated_params"],
                "flops_per_token": acc["flops_per_token"], "train_loss": s.get("train_loss"),
                "val_loss": s.get("val_loss"), "val_ppl": s.get("val_ppl"), "sparsity": measured,
                "train_tokens_per_s": s.get("train_tokens_per_s"), "decode_tokens_per_s": s.get("decode_tokens_per_s"),
                "decode_ms_per_token": ms, "tokens": None if self.record else s.get("tokens")}  # training tokens


def explicit(obj: Any, prefix: str = "") -> dict[str, Any]:
    """The settings of a validated recipe that are not defaults, flattened; block kinds always."""
    out: dict[str, Any] = {}
    if isinstance(obj, BlockSpec):
        out[prefix + "kind"] = obj.kind
        out.update(explicit(obj.config, prefix))
        for role, spec in obj.roles.items():
            out.update(explicit(spec, f"{prefix}roles.{role}."))
        return out
    for f in dataclasses.fields(obj):
        if not f.init or f.metadata.get("internal"):
            continue
        v = getattr(obj, f.name)
        if isinstance(v, BlockSpec) or (dataclasses.is_dataclass(v) and not isinstance(v, type)):
            out.update(explicit(v, f"{prefix}{f.name}."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if v != default:
            out[prefix + f.name] = to_plain(v)
    return out


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not (path / SUMMARY).is_file():
        what = "has not finished (no summary.json)" if (path / RECIPE).is_file() else "is not a zoo run folder"
        raise ZooError(f"{path}: {what}")
    summary = json.loads((path / SUMMARY).read_text(encoding="utf-8"))
    curve, layer_grads = [], []
    for line in (path / METRICS).read_text(encoding="utf-8").splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("split") == "val":
            curve.append((rec["tokens"], rec["val_loss"]))
        elif rec.get("layer_grad_norms"):
            layer_grads.append((rec["step"], rec["layer_grad_norms"]))
    recipe = load_recipe(path / RECIPE)
    scores = json.loads((path / TASKS).read_text(encoding="utf-8")) if (path / TASKS).is_file() else {}
    decode = json.loads((path / DECODE).read_text(encoding="utf-8")) if (path / DECODE).is_file() else None
    return Run(path, flatten(recipe.to_dict()), summary, curve, explicit(recipe), path.name, layer_grads,
               columns(scores), decode or summary.get("decode"))


def load_record(path: str | Path) -> Run:
    """An evaluation record as a row: its task scores and held-out perplexities are columns."""
    path = Path(path)
    record = read_record(path)
    try:
        recipe = recipe_from_dict(record["recipe"], source=str(path / EVALUATION))
    except ZooError as err:
        raise ZooError(f"{path / EVALUATION}: its recipe cannot be read here: {err}") from None
    held = {f"heldout {name}": {"ppl": r["ppl"]} for name, r in record.get("heldout", {}).items()
            if isinstance(r, dict)}
    return Run(path, flatten(recipe.to_dict()), record, [], explicit(recipe), path.name, [],
               columns({**record.get("tasks", {}), **held}), record.get("decode"), record=True)


def columns(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task: {metric: value}} -> {"task/metric": value}."""
    return {f"{task}/{metric}": v for task, metrics in scores.items() for metric, v in metrics.items()}


def find_runs(paths: list[str | Path], records: bool = False) -> list[Run]:
    """Run folders given directly, or found one level down (a sweep or quickstart folder); with `records`,
    evaluation records too (`zoo eval --save`), given or found the same way."""

    def wanted(p: Path) -> bool:
        return (p / SUMMARY).is_file() or (records and is_record(p))

    runs = []
    for p in map(Path, paths):
        if (p / RECIPE).is_file():
            runs.append(load_run(p))
        elif records and is_record(p):
            runs.append(load_record(p))
        elif p.is_dir() and any(wanted(c) for c in p.iterdir()):
            runs += [load_record(c) if is_record(c) else load_run(c) for c in sorted(p.iterdir()) if wanted(c)]
        elif is_record(p):
            raise ZooError(f"{p}: an evaluation record, not a run folder")
        else:
            raise ZooError(f"{p}: not a run folder (no {RECIPE}) nor a folder of finished runs"
                           + (" nor an evaluation record" if records else ""))
    if not runs:
        raise ZooError("no runs to compare")
    names = [r.label for r in runs]
    for r in runs:  # sweeps name their runs seed-0, seed-1...: add the parent folder when names repeat
        if names.count(r.label) > 1:
            r.label = f"{r.path.parent.name}/{r.path.name}"
    return runs


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def compare(runs: list[Run]) -> list[dict]:
    """One row per group of runs that differ only by seed: differing recipe keys and metrics (mean, std)."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        key = str(r.path) if r.record else json.dumps(
            {k: v for k, v in r.recipe.items() if k not in IGNORED}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(r)
    reps = [g[0].recipe for g in groups.values()]
    keys = sorted({k for rec in reps for k in rec} - set(IGNORED))
    differing = [k for k in keys if len({json.dumps(rec.get(k), default=str) for rec in reps}) > 1]
    settings = [g[0].settings for g in groups.values()]
    salient = [k for k in sorted({k for st in settings for k in st} - set(IGNORED))
               if len({json.dumps(st.get(k), default=str) for st in settings}) > 1]
    rows = []
    for g in groups.values():
        row = {"run": g[0].label if len(g) == 1 else f"{g[0].label} (+{len(g) - 1})",
               "runs": [str(r.path) for r in g], "record": g[0].record,
               "seeds": [] if g[0].record else sorted(r.recipe.get("train.seed", 0) for r in g),
               "differences": {k: g[0].recipe.get(k) for k in differing},
               "settings": {k: g[0].recipe[k] for k in salient if k in g[0].recipe}}
        for m in METRIC_KEYS:
            mean, std = _mean_std([r.metrics()[m] for r in g])
            row[m] = mean
            row[m + "_std"] = std
        row["decode_threads"] = sorted({r.decode["threads"] for r in g if r.decode})
        row["decode_compiled"] = sorted({r.decode["compiled"] for r in g if r.decode})
        row["tasks"] = {k: _mean_std([r.tasks.get(k) for r in g])[0] for k in sorted({k for r in g for k in r.tasks})}
        per_layer = [np.mean([n for _, n in r.layer_grads], axis=0) for r in g if r.layer_grads]
        if per_layer and len({len(v) for v in per_layer}) == 1:  # mean over steps, then over seeds
            row["layer_grad_norms"] = np.mean(per_layer, axis=0).round(6).tolist()
        rows.append(row)
    return rows


def _unit(values: list[float | None]) -> tuple[str, float]:
    """One unit for a whole column of counts or rates (so that 9.2k and 11.8k, not 9151.7 and 11.8k)."""
    top = max((abs(v) for v in values if v is not None), default=0.0)
    return next(((u, s) for u, s in (("G", 1e9), ("M", 1e6), ("k", 1e3)) if top >= 10 * s), ("", 1.0))


def _fmt(v: float | None, std: float | None, digits: int, unit: tuple[str, float] = ("", 1.0)) -> str:
    if v is None:
        return "-"
    if digits == 0:  # a count or a rate: in the column's unit
        name, scale = unit
        return f"{v / scale:.1f}{name}" if name else f"{v:.0f}"
    return f"{v:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


COLUMNS = [("params", "total_params", 0), ("act.params", "activated_params", 0), ("FLOPs/tok", "flops_per_token", 0),
           ("train", "train_loss", 3), ("val", "val_loss", 3), ("ppl", "val_ppl", 2), ("sparsity", "sparsity", 2),
           ("train tok/s", "train_tokens_per_s", 0), ("decode ms/tok", "decode_ms_per_token", 2)]


def _how(row: dict) -> str:
    """How a row's decode time was taken: threads, and `eager` when the layer steps were not compiled."""
    threads = "/".join(map(str, row.get("decode_threads", [])))
    eager = " eager" if False in row.get("decode_compiled", []) else ""
    return f" ({threads}t{eager})" if threads else ""


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells for printing: run, seeds, the metrics, the lm-eval task scores, then the settings that
    differ between rows (as `--set` takes them)."""
    tasks = sorted({k for r in rows for k in r.get("tasks", {})})
    headers = ["run", "seeds", *(h for h, _, _ in COLUMNS), *tasks, "differs in"]
    units = {k: _unit([r[k] for r in rows]) for _, k, _ in COLUMNS}
    cells = []
    for r in rows:
        settings = " ".join(f"{k}={inline_toml(v)}" for k, v in r["settings"].items()) or "-"
        how = {"decode_ms_per_token": _how(r) if r["decode_ms_per_token"] is not None else ""}
        cells.append([r["run"], ",".join(map(str, r["seeds"])) or "-",
                      *(_fmt(r[k], r[k + "_std"], d, units[k]) + how.get(k, "") for _, k, d in COLUMNS),
                      *(_fmt(r.get("tasks", {}).get(k), None, 4) for k in tasks), settings])
    return headers, cells


def plot(runs: list[Run], rows: list[dict], path: str | Path) -> Path:
    """Validation loss vs tokens (every run) and final validation loss vs activated parameters (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    color = {p: f"C{i % 10}" for i, row in enumerate(rows) for p in row["runs"]}  # seeds of a row share a colour
    labelled = set()
    for r in runs:
        if r.curve:
            t, v = zip(*r.curve)
            c = color.get(str(r.path), "C0")
            a.plot(t, v, marker=".", color=c, label=None if c in labelled else r.label.split("/")[0])
            labelled.add(c)
    a.set_xlabel("training tokens")
    a.set_ylabel("validation loss (nats/token)")
    a.set_title("validation loss vs tokens")
    a.legend(fontsize=7)
    for row in (r for r in rows if r["val_loss"] is not None):  # a record of lm-eval tasks alone has no val loss
        b.errorbar(row["activated_params"], row["val_loss"], yerr=row["val_loss_std"] or 0, fmt="o", capsize=3,
                   color=color[row["runs"][0]])
        b.annotate(row["run"], (row["activated_params"], row["val_loss"]), fontsize=7,
                   xytext=(4, 4), textcoords="offset points")
    b.set_xscale("log")
    b.set_xlabel("activated parameters per token")
    b.set_ylabel("final validation loss")
    b.set_title("final loss vs activated parameters")
    return _save(fig, path)


def plot_layer_grads(runs: list[Run], rows: list[dict], path: str | Path) -> Path:
    """Per-block gradient norms (runs trained with `train.layer_grad_norms = true`): left, the mean over
    logged steps for each block, layer 0 nearest the embedding (mean ± std over seeds); right, over
    training, the lowest block's norm divided by the highest's (mean over seeds): whether the
    gradient reaching the lower layers fades, as the Q-Sparse paper argues it does without STE."""
    with_grads = [r for r in rows if "layer_grad_norms" in r]
    if not with_grads:
        raise ZooError("no run logged per-layer gradient norms: train with train.layer_grad_norms = true")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_path = {str(r.path): r for r in runs}
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, row in enumerate(with_grads):
        seeds = [by_path[p] for p in row["runs"] if by_path[p].layer_grads]
        per_seed = np.array([np.mean([n for _, n in r.layer_grads], axis=0) for r in seeds])
        layers = np.arange(per_seed.shape[1])
        std = per_seed.std(0, ddof=1) if len(per_seed) > 1 else None
        label = row["run"].split("/")[0] + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else "")
        a.errorbar(layers, per_seed.mean(0), yerr=std, marker="o", capsize=3, color=f"C{i}", label=label)
        steps = sorted({s for r in seeds for s, _ in r.layer_grads})
        ratio = [np.mean([n[0] / n[-1] for r in seeds for s2, n in r.layer_grads if s2 == s and n[-1] > 0] or [np.nan])
                 for s in steps]
        b.plot(steps, ratio, color=f"C{i}", label=label)
    a.set_yscale("log")
    a.set_xlabel("block (0 = nearest the embedding)")
    a.set_ylabel("gradient norm (mean over logged steps)")
    a.set_title("gradient norm per block")
    a.legend(fontsize=7)
    b.axhline(1.0, color="grey", lw=0.5)
    b.set_yscale("log")
    b.set_xlabel("step")
    b.set_ylabel("lowest block / highest block")
    b.set_title("lowest-block gradient norm relative to the highest")
    b.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Lay out and write a figure (its folder made if missing), then free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
