"""Standard evaluation through lm-eval (EleutherAI's harness; the optional `eval` extra).

`ZooLM` is a loaded zoo model and its tokenizer as an lm-eval model (`zoo eval --tasks` builds it; in
Python: `ZooLM(zoo.load(x), tokenizer)`): `loglikelihood` (batched, right-padded), `loglikelihood_rolling` (lm-eval's
disjoint rolling windows of max_seq_len tokens) and `generate_until` (greedy, KV cache). No
dataset hub is reachable, so the tasks zoo ships (zoo.eval.tasks) read local files generated from
bundled text; any other lm-eval task runs when its data is local.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from zoo.errors import ZooError, did_you_mean
from zoo.eval.tasks import LOCAL, task_config

try:
    from lm_eval import simple_evaluate
    from lm_eval.api.model import TemplateLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ModuleNotFoundError:  # pragma: no cover - exercised by the CLI's message when lm-eval is absent
    raise ZooError("standard evaluation needs lm-eval: pip install 'qsparse-zoo[eval]'") from None


def end_of_text(ckpt: Path, tok) -> int:
    """The id lm-eval prefixes and stops at: tokenizer_config.json's eos_token when it is one token, else newline's."""
    config = Path(ckpt) / "tokenizer_config.json"
    eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token") if config.is_file() else None
    ids = tok.encode(eos) if isinstance(eos, str) else []
    return ids[0] if len(ids) == 1 else tok.encode("\n")[-1]


class ZooLM(TemplateLM):
    """A zoo model (zoo.load) and its tokenizer, scored and sampled the way lm-eval asks."""

    def __init__(self, model, tokenizer, eot: int | None = None, batch_size: int = 8, max_gen_toks: int = 64):
        super().__init__()
        self.model, self.tok = model.eval(), tokenizer
        self.eot = eot if eot is not None else tokenizer.encode("\n")[-1]
        self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)
        self.max_length = model.config.max_seq_len
        self.where = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.eot

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return self.tok.encode(string)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives it), in batches of similar length.

        A continuation longer than the context window is scored in pieces of up to max_seq_len targets,
        each predicted from as much preceding text as fits."""
        pieces = []  # (request, input ids, targets: the tokens its last positions predict)
        for r, (_, context, continuation) in enumerate(requests):
            ids, n, L = [*context, *continuation], len(continuation), self.max_length
            for b in range(len(ids), len(ids) - n, -L):
                a = max(b - L, len(ids) - n)
                pieces.append((r, ids[max(0, b - 1 - L):b - 1], ids[a:b]))
        order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i][1]))
        score, greedy = [0.0] * len(requests), [True] * len(requests)
        for start in range(0, len(order), self.batch_size):
            batch = [pieces[i] for i in order[start:start + self.batch_size]]
            x = torch.zeros(len(batch), max(len(ids) for _, ids, _ in batch), dtype=torch.long)
            for b, (_, ids, _) in enumerate(batch):
                x[b, :len(ids)] = torch.tensor(ids)
            logp = F.log_softmax(self.model(x.to(self.where)).logits.float(), dim=-1)
            for b, (r, ids, targets) in enumerate(batch):
                pred = logp[b, len(ids) - len(targets):len(ids)]
                t = torch.tensor(targets, device=pred.device)
                score[r] += float(pred.gather(-1, t[:, None]).sum())
                greedy[r] = greedy[r] and bool((pred.argmax(-1) == t).all())
        return list(zip(score, greedy))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            out.append(sum(s for s, _ in scores))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-(self.max_length - 1):]
            budget = min(budget, self.max_length - len(ids))
            new: list[int] = []
            text = ""
            for nxt in self.model.generate(torch.tensor([ids], device=self.where), budget, temperature=0):
                token = int(nxt[0, 0])
                if token == self.eot:
                    break
                new.append(token)
                text = self.tok.decode(new)
                if any(u in text for u in until):
                    break
            cut = min((text.find(u) for u in until if u in text), default=len(text))
            out.append(text[:cut])
        return out


def run_tasks(lm: ZooLM, tasks: list[str], limit: int | None = None, include: str | None = None) -> dict[str, Any]:
    """{task: {metric: value}} from lm-eval's simple_evaluate on `tasks` (zoo's local tasks by name, or any
    lm-eval task whose data is local)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing is downloaded: a task's data is local or it fails
    manager = TaskManager(include_path=include) if include else TaskManager()
    specs: list[Any] = []
    for name in tasks:
        if name in LOCAL:
            specs.append(task_config(name))
            continue
        if name not in manager.all_tasks:
            raise ZooError(f"--tasks: unknown task {name!r}{did_you_mean(name, [*LOCAL, *manager.all_tasks])}; "
                           f"zoo's local tasks: {', '.join(LOCAL)}")
        specs.append(name)
    try:
        results = simple_evaluate(model=lm, tasks=specs, limit=limit, task_manager=manager, log_samples=False,
                                  bootstrap_iters=0, verbosity="ERROR")
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ZooError(f"--tasks {','.join(tasks)}: a task's data is not local ({first})") from None
    return {task: {k.split(",")[0]: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and k != "sample_len" and "_stderr" not in k}
            for task, metrics in results["results"].items()}
