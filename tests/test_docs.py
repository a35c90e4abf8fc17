"""Generated docs stay in sync with the code; README keeps its two set-up commands at the top."""

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
    import zoo

    text = (ROOT / "docs/recipes.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```toml\n")[1:]]
    checked = [zoo.loads_recipe(b) for b in blocks if "extends" not in b]
    assert len(checked) >= 2
    patterned = next(r for r in checked if r.model.layers)
    m = patterned.model
    assert m.layer(0)["ffn"].kind == "glu" and m.layer(1)["ffn"].kind == "moe"
    assert m.layer(7)["sparsity"].for_role("down").config.keep == 0.6
    assert m.layer(6)["sparsity"].for_role("down").config.keep == 0.5
