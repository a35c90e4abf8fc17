"""Generated docs stay in sync with the code; README keeps its two set-up commands at the top."""

import zoo
from tests.conftest import ROOT
from zoo.reference import builtin_reference, main


def test_reference_is_up_to_date():
    committed = (ROOT / "docs/reference.md").read_text(encoding="utf-8")
    assert committed == builtin_reference(), (
        "docs/reference.md is stale: run `python -m zoo.reference` and commit the result")


def test_reference_lists_every_builtin_block_and_section():
    text = builtin_reference()
    for heading in ("### `[model]`", "### `[[model.layers]]`", "#### `ffn.glu`", "#### `norm.rmsnorm`",
                    "#### `weights.fp`", "| `hidden` | int \\| None |"):
        assert heading in text


def test_docs_command_check_and_write(tmp_path, capsys):
    out = tmp_path / "ref.md"
    assert main([str(out), "--check"]) == 1 and "is stale" in capsys.readouterr().err
    assert main([str(out)]) == 0 and out.read_text() == builtin_reference()
    assert main([str(out), "--check"]) == 0


def test_readme_starts_with_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block[0].startswith("pip install -e . && zoo ")
    assert block[1].startswith('pip install -e ".[dev]" && pytest')


def test_recipe_examples_in_docs_are_valid():
    text = (ROOT / "docs/recipes.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```toml\n")[1:]]
    checked = [zoo.loads_recipe(b) for b in blocks if "extends" not in b]
    assert len(checked) >= 2
    patterned = next(r for r in checked if r.model.layers)
    m = patterned.model
    assert m.layer(0)["ffn"].kind == "glu" and m.layer(1)["ffn"].kind == "moe"
    assert m.layer(7)["sparsity"].for_role("down").config.keep == 0.6
    assert m.layer(6)["sparsity"].for_role("down").config.keep == 0.5


# -- every example in the docs: `zoo` command lines parse, their --set keys exist, cheap blocks run --------
#
# A fenced block preceded by the line `<!-- run -->` is run, command by command, in a temporary folder
# (recipes/ and plugins/ linked in), training shortened by SHORT; every other `zoo ...` line of a fenced
# block or an inline code span is parsed by the real argparse parser, and its `--set` / `--grid` keys are
# checked against the recipe schema (the whole recipe is validated when RECIPE is a file of this repo).

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "plugins").glob("*/README.md"))]
RUN_MARK = "<!-- run -->"
SHORT = ["--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.seq_len=16",
         "--set", "train.eval_batches=1", "--set", "train.eval_every=0"]
PREFIXES = ("$", "nice", "-n", "10")  # a prompt and the wrappers used in the docs before `zoo`


def fenced_blocks(path):
    """(line number, language, text, marked to run) of every fenced block of a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang, start = lines[i][3:].strip(), i
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            marked = start > 0 and lines[start - 1].strip() == RUN_MARK
            blocks.append((start + 1, lang, "\n".join(lines[start + 1:end]), marked))
            i = end
        i += 1
    return blocks


def shell_commands(text):
    """The `zoo` commands of a shell snippet as argument lists: continuations joined, comments dropped,
    `a; b` and `a && b` split, VAR="..." assignments and `for v in a b` loops expanded (first value)."""
    import re
    import shlex

    text = text.replace("\\\n", " ")
    env = {}
    for m in re.finditer(r'^(\w+)="([^"]*)"', text, re.M):
        env[m.group(1)] = m.group(2)
    for m in re.finditer(r"^\s*for (\w+) in (\S+)", text, re.M):
        env[m.group(1)] = m.group(2)
    commands = []
    for line in text.splitlines():
        line = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), line)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        words, part = list(lexer), []
        for w in [*words, ";"]:
            if w in (";", "&&", "||", "|"):
                while part and (part[0] in PREFIXES or re.fullmatch(r"\w+=\S*", part[0])):
                    part = part[1:]
                if part[:1] == ["zoo"]:
                    commands.append(part[1:])
                part = []
            else:
                part.append(w)
    return commands


def doc_commands():
    """(where, argv) for every `zoo` command of the docs: fenced shell blocks and inline code spans."""
    import re

    found = []
    for path in DOCS:
        name = path.relative_to(ROOT)
        for line, lang, text, _ in fenced_blocks(path):
            if lang in ("bash", "sh", ""):
                found += [(f"{name}:{line}", argv) for argv in shell_commands(text)]
        prose = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
        for span in re.findall(r"`(zoo [^`]+)`", prose):
            if not re.search(r"\[|\.\.\.|…|\b[A-Z]{2,}\b| [A-Z]\b", span) and span not in SHOWN_FAILING:  # not usage
                found += [(f"{name}: `{span}`", argv) for argv in shell_commands(span)]
    return found


SHOWN_FAILING = {"zoo bench kernels --device nonsense"}  # inline examples of a refused command line


def incomplete(err) -> bool:
    """A parse error of a command named in prose without its arguments (`zoo train`, `zoo compare --plot`)."""
    return "arguments are required" in str(err) or "expected one argument" in str(err)


def schema_has(key: str) -> bool:
    """Whether a dotted recipe key (`model.layers[0].ffn.hidden`) names a field of some block kind."""
    import dataclasses
    import re
    import typing

    from zoo.recipe.recipe import Recipe
    from zoo.registry import get_registry

    registry = get_registry()
    here: list = [Recipe]
    for step in re.sub(r"\[\d+\]", "", key).split("."):
        nxt = []
        if dict in here:  # a table of free keys, or a block's roles: anything below
            return True
        if step in ("kind", "roles") and any(isinstance(c, tuple) for c in here):
            nxt.append(dict if step == "roles" else None)
        # a block (slot,): the step is a field of one of the slot's kinds
        here = [c for h in here for c in ([e.config for e in registry.list(h[0])] if isinstance(h, tuple) else [h])]
        for cls in here:
            if cls is None or not dataclasses.is_dataclass(cls):
                continue
            field = next((f for f in dataclasses.fields(cls) if f.name == step and f.init), None)
            if field is None:
                continue
            if field.metadata.get("slot"):
                nxt.append((field.metadata["slot"],))
                continue
            tp = typing.get_type_hints(cls)[step]
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            nxt.append(tp if dataclasses.is_dataclass(tp) else args[0] if args and dataclasses.is_dataclass(args[0])
                       else dict if typing.get_origin(tp) is dict else None)
        here = nxt
        if not here:
            return False
    return True


def test_every_zoo_command_in_the_docs_parses_and_its_keys_exist():
    from zoo.cli import UsageError, make_parser
    from zoo.recipe.loader import parse_override

    commands = doc_commands()
    assert len(commands) > 60
    problems = []
    for where, argv in commands:
        try:
            args = make_parser().parse_args(argv)
        except UsageError as err:
            if not (where.endswith("`") and incomplete(err)):
                problems.append(f"{where}: {err}")
            continue
        items = [*getattr(args, "overrides", []), *(g.split("=", 1)[0] + "=0" for g in getattr(args, "grid", []))]
        for item in items:
            key = ".".join(parse_override(item)[0])
            if not schema_has(key):
                problems.append(f"{where}: --set {key}: no such recipe key")
        recipe = ROOT / str(getattr(args, "recipe", "") or "-")
        if recipe.is_file() and recipe.is_relative_to(ROOT / "recipes") and not problems:  # (plugins' need them)
            try:
                zoo.load_recipe(recipe, list(getattr(args, "overrides", [])))
            except zoo.ZooError as err:
                problems.append(f"{where}: {err}")
    assert not problems, "\n".join(problems)


def test_schema_has_knows_block_fields_roles_and_layer_patterns():
    for key in ("model.n_layers", "model.ffn.hidden", "model.ffn.activation.kind", "model.sparsity.keep",
                "model.weights.roles.down.kind", "model.layers[0].ffn.hidden", "train.schedule.warmup_steps",
                "optim.betas", "model.ffn.expert.hidden", "data.dataset.paths"):
        assert schema_has(key), key
    for key in ("model.n_layer", "model.ffn.hiden", "train.steps.x", "modle.d_model", "model.layers[0].range.x"):
        assert not schema_has(key), key


def test_marked_examples_run(tmp_path, monkeypatch, capsys):
    from zoo.cli import main

    for name in ("recipes", "plugins"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    ran = []
    for path in DOCS:
        for line, lang, text, marked in fenced_blocks(path):
            if not marked:
                continue
            assert lang == "bash", f"{path.name}:{line}: only shell blocks are run"
            for argv in shell_commands(text):
                argv = [*argv, *SHORT] if argv[0] == "train" else argv
                code = main(argv)
                out = capsys.readouterr()
                assert code == 0, f"{path.relative_to(ROOT)}:{line}: zoo {' '.join(argv)}\n{out.err}"
                ran.append(argv[0])
    assert {"list", "show", "build", "train", "eval", "generate", "compare"} <= set(ran)


def test_every_python_and_toml_block_in_the_docs_parses():
    import ast

    import tomllib

    count = 0
    for path in DOCS:
        for line, lang, text, _ in fenced_blocks(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if lang == "python":
                ast.parse(text, where)
            elif lang == "toml":
                tomllib.loads(text)
            else:
                continue
            count += 1
    assert count >= 20
