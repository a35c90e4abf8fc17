"""Recipes: TOML reading, extends, overrides, validation errors (file, key path, did-you-mean), round trip."""

from pathlib import Path

import pytest

import zoo
from tests.conftest import RECIPES
from zoo.errors import RecipeError
from zoo.recipe.loader import OVERRIDES


def error_of(path, overrides=None) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        zoo.load_recipe(path, overrides)
    return info.value


def test_tiny_recipe_loads_typed_and_frozen():
    r = zoo.load_recipe(RECIPES / "tiny/dense.toml")
    assert r.name == "dense" and r.model.d_model == 192 and r.model.ffn.kind == "glu"
    assert r.model.ffn.config.hidden == 512 and r.model.ffn.config.activation.kind == "silu"
    assert r.model.attention.kind == "mha" and r.model.tie_embeddings is True
    with pytest.raises(AttributeError):
        r.model.d_model = 3


@pytest.mark.parametrize("text, line, column", [
    ("[model]\nd_model = 64\nn_layers = \n", 3, 12),
    ("[model\n", 1, 7),
    ('name = "a"\nname = "b"\n', 2, 1),
])
def test_malformed_toml_names_line_and_column(recipe_file, text, line, column):
    path = recipe_file(text)
    err = error_of(path)
    assert err.file == str(path)
    assert f"line {line}, column {column}" in str(err) and "malformed TOML" in str(err)


def test_missing_file_and_folder(tmp_path):
    assert "file not found" in str(error_of(tmp_path / "nope.toml"))
    assert "is a folder" in str(error_of(tmp_path))


@pytest.mark.parametrize("text, path, words", [
    ("modle = 3\n", "modle", ['did you mean "model"', "valid keys: name, model"]),
    ("[model]\nd_modle = 64\n", "model.d_modle", ['did you mean "d_model"']),
    ("[model.ffn]\nhiden = 3\n", "model.ffn.hiden", ['did you mean "hidden"', "hidden, activation, bias"]),
    ('[model]\nd_model = "x"\n', "model.d_model", ["expected an integer", "'x'"]),
    ("[model]\nd_model = 1.5\n", "model.d_model", ["expected an integer"]),
    ("[model]\ntie_embeddings = 1\n", "model.tie_embeddings", ["expected true or false"]),
    ("[model]\nn_layers = 0\n", "model.n_layers", ["must be >= 1, got 0"]),
    ("[model]\ninit_std = 0.0\n", "model.init_std", ["must be > 0"]),
    ('[model.ffn]\nkind = "gul"\n', "model.ffn.kind", ['did you mean "glu"', "registered: glu, mlp"]),
    ('[model.ffn]\nactivation = "slu"\n', "model.ffn.activation.kind", ['did you mean "silu"']),
    ("[model.ffn]\nactivation = 3\n", "model.ffn.activation", ["expected a table with 'kind'"]),
    ('[model]\ndtype = "float61"\n', "model.dtype", ['did you mean "float16"', "one of: bfloat16, float16"]),
    ('[model.weights.roles]\nqkvv = { dtype = "float16" }\n', "model.weights.roles.qkvv", ['did you mean "qkv"']),
    ("[model.weights]\nroles = 3\n", "model.weights.roles", ["expected a table of roles"]),
    ("[model]\nn_heads = 5\n", "model.n_heads", ["n_heads=5 must divide d_model=256"]),
    ("[model]\nn_heads = 4\nn_kv_heads = 3\n", "model.n_kv_heads", ["n_kv_heads=3 must divide n_heads=4"]),
    ('[[model.layers]]\nrange = "0-9"\n', "model.layers[0].range", ["outside layers 0-3"]),
    ('[[model.layers]]\nrange = "x"\n', "model.layers[0].range", ['use "3", "0-5", "4-" or "all"']),
    ('[[model.layers]]\nrange = "1"\n[[model.layers]]\nrange = "2"\nfnn = "mlp"\n', "model.layers[1].fnn",
     ['did you mean "ffn"']),
    ("[[model.layers]]\nevery = 2\n", "model.layers[0].range", ["required key is missing"]),
    ("[optim]\nbetas = 0.9\n", "optim.betas", ["expected an array"]),
    ('[optim]\nbetas = [0.9, "x"]\n', "optim.betas[1]", ["expected a number"]),
    ("[optim]\nlr = nan\n", "optim.lr", ["finite"]),
    ("[model.ffn]\nhidden = -1\n", "model.ffn.hidden", ["must be >= 1, got -1"]),
])
def test_validation_errors_name_file_path_and_fix(recipe_file, text, path, words):
    file = recipe_file(text)
    err = error_of(file)
    assert (err.file, err.path) == (str(file), path)
    assert str(err).startswith(f"{file}:{path}: ")
    for w in words:
        assert w in str(err)
    assert "\n" not in str(err)


def test_unknown_key_of_a_block_without_settings(recipe_file):
    err = error_of(recipe_file('[data.dataset]\nkind = "kjv"\nbook = "Genesis"\n'))
    assert err.path == "data.dataset.book" and err.reason == "unknown key; this block takes no settings besides kind"


def test_kind_missing_lists_kinds(recipe_file):
    err = error_of(recipe_file('[[model.layers]]\nrange = "0"\nffn = { hidden = 3 }\n[model]\nffn = { kind = "mlp" }\n'
                               '[model.weights]\nroles = { qkv = { kind = "nope" } }\n'))
    assert err.path == "model.weights.roles.qkv.kind" and "registered: bitnet158, fp" in str(err)


def test_extends_deep_merges_and_child_wins(recipe_file):
    recipe_file('name = "base"\n[model]\nd_model = 64\nn_heads = 4\n[model.ffn]\nkind = "glu"\nhidden = 100\n'
                '[model.ffn.activation]\nkind = "gelu"\napproximate = true\n', "base/b.toml")
    child = recipe_file('extends = "base/b.toml"\n[model]\nn_layers = 3\n[model.ffn]\nhidden = 200\n', "c.toml")
    r = zoo.load_recipe(child)
    assert r.name == "base" and r.model.d_model == 64 and r.model.n_layers == 3
    assert r.model.ffn.config.hidden == 200
    assert r.model.ffn.config.activation.kind == "gelu" and r.model.ffn.config.activation.config.approximate


def test_extends_chain_relative_to_each_file(recipe_file):
    recipe_file("[model]\nd_model = 64\n", "a/base.toml")
    recipe_file('extends = "../a/base.toml"\n[model]\nn_layers = 2\n', "b/mid.toml")
    leaf = recipe_file('extends = "b/mid.toml"\n[model]\nn_heads = 8\n', "leaf.toml")
    m = zoo.load_recipe(leaf).model
    assert (m.d_model, m.n_layers, m.n_heads) == (64, 2, 8)


def test_extends_arrays_are_replaced(recipe_file):
    recipe_file('[[model.layers]]\nrange = "0"\nffn = "mlp"\n[[model.layers]]\nrange = "1"\nffn = "mlp"\n', "b.toml")
    child = recipe_file('extends = "b.toml"\n[[model.layers]]\nrange = "3"\nffn = "mlp"\n', "c.toml")
    assert [p.range for p in zoo.load_recipe(child).model.layers] == ["3"]


def test_extends_cycle(recipe_file):
    recipe_file('extends = "b.toml"\n', "a.toml")
    b = recipe_file('extends = "c.toml"\n', "b.toml")
    recipe_file('extends = "b.toml"\n', "c.toml")
    err = error_of(b)
    assert err.path == "extends" and "cyclic extends: b.toml -> c.toml -> b.toml" in str(err)
    self_loop = recipe_file('extends = "self.toml"\n', "self.toml")
    assert "cyclic extends: self.toml -> self.toml" in str(error_of(self_loop))


def test_extends_missing_and_wrong_type(recipe_file):
    err = error_of(recipe_file('extends = "nope.toml"\n'))
    assert err.path == "extends" and "'nope.toml', which does not exist" in str(err)
    err = error_of(recipe_file("extends = 3\n"))
    assert err.path == "extends" and "expected a path string" in str(err)


def test_error_names_the_file_that_set_the_key(recipe_file):
    base = recipe_file("[model.ffn]\nhiden = 3\n", "base.toml")
    child = recipe_file('extends = "base.toml"\n[model]\nd_model = 64\n', "child.toml")
    err = error_of(child)
    assert (err.file, err.path) == (str(base), "model.ffn.hiden")
    child2 = recipe_file('extends = "base.toml"\n[model.ffn]\nhiden = 4\n', "child2.toml")
    assert error_of(child2).file == str(child2)


def test_overrides_parse_toml_values(recipe_file):
    path = recipe_file('[model]\nd_model = 64\n')
    r = zoo.load_recipe(path, ["model.n_layers=3", "model.ffn.kind=mlp", 'name="x y"', "model.tie_embeddings=false",
                               "optim.betas=[0.8, 0.9]", "model.ffn.activation={kind='gelu', approximate=true}"])
    assert r.model.n_layers == 3 and r.model.ffn.kind == "mlp" and r.name == "x y"
    assert r.model.tie_embeddings is False and r.optim.config.betas == (0.8, 0.9)
    assert r.model.ffn.config.activation.config.approximate is True
    assert zoo.load_recipe(path, {"model.n_layers": 5}).model.n_layers == 5


def test_override_errors(recipe_file):
    path = recipe_file('[model]\nd_model = 64\n')
    err = error_of(path, ["model.d_model"])
    assert err.file == OVERRIDES and "not of the form key.path=value" in str(err)
    err = error_of(path, ["model.d_model.x=3"])
    assert (err.file, err.path) == (OVERRIDES, "model.d_model") and "cannot set a key inside an integer" in str(err)
    err = error_of(path, ["model.ffn.hidden=-1"])
    assert (err.file, err.path) == (OVERRIDES, "model.ffn.hidden") and "must be >= 1" in str(err)
    err = error_of(path, ["model.n_heads=5"])
    assert (err.file, err.path) == (OVERRIDES, "model.n_heads")


def test_overrides_index_arrays_and_open_kind_shorthands(recipe_file):
    path = recipe_file('[model]\nn_layers = 3\n[[model.layers]]\nrange = "0"\nffn = "mlp"\n')
    r = zoo.load_recipe(path, ["model.layers[0].ffn.hidden=40", 'model.layers[0].range="2"'])
    assert r.model.layers[0].range == "2" and r.model.layer(2)["ffn"].kind == "mlp"
    assert r.model.layer(2)["ffn"].config.hidden == 40
    err = error_of(path, ["model.layers[1].ffn=glu"])
    assert (err.file, err.path) == (OVERRIDES, "model.layers[1]") and "the array has 1 entries" in str(err)
    err = error_of(path, ["model.n_layers[0]=1"])
    assert err.path == "model.n_layers" and "is an integer, not an array" in str(err)
    err = error_of(path, ["model.layers[0].ffn.hidden=-1"])
    assert (err.file, err.path) == (OVERRIDES, "model.layers[0].ffn.hidden")
    err = error_of(recipe_file("[model]\nn_layers = 2\n", "flat.toml"), ["model.layers[0].ffn.hidden=512"])
    assert (err.file, err.path) == (OVERRIDES, "model.layers") and "has no array here for [0]" in err.reason
    assert "--set 'model.layers=[{...}]'" in err.reason


def test_paths_are_relative_to_the_file_that_set_them(recipe_file, tmp_path, monkeypatch):
    recipe_file('[train]\ninit_from = "ckpt"\n[data.dataset]\nkind = "files"\npaths = ["text", "/abs/t.txt"]\n'
                '[data.tokenizer]\nkind = "file"\npath = "~/tok.json"\n', "base/base.toml")
    child = recipe_file('extends = "base/base.toml"\n[model]\nn_layers = 2\n', "child.toml")
    monkeypatch.chdir(tmp_path.parent)  # the working directory is neither file's folder
    r = zoo.load_recipe(child.relative_to(tmp_path.parent))
    assert r.train.init_from == str(tmp_path / "base" / "ckpt")
    assert r.data.dataset.config.paths == (str(tmp_path / "base" / "text"), "/abs/t.txt")
    assert r.data.tokenizer.config.path == str(Path.home() / "tok.json")
    over = zoo.load_recipe(child, ["train.init_from=runs/x"])  # a --set value: the working directory
    assert over.train.init_from == str(tmp_path.parent / "runs" / "x")
    assert zoo.load_recipe(child, ["model.n_layers=3"]).train.init_from == r.train.init_from
    assert r.replace(**{"train.init_from": "y"}).train.init_from == str(tmp_path.parent / "y")
    saved = recipe_file(r.to_toml(), "elsewhere/recipe.toml")  # a run folder's copy names the same files
    assert zoo.load_recipe(saved) == r
    assert zoo.loads_recipe('[train]\ninit_from = "z"\n').train.init_from == str(tmp_path.parent / "z")


def test_errors_found_after_validation_name_the_file_that_set_the_key(recipe_file):
    base = recipe_file('[model.sparsity]\nkind = "block_topk"\nm = 20\n', "base.toml")
    child = recipe_file('extends = "base.toml"\n[model]\nd_model = 64\nn_heads = 4\n', "child.toml")
    for overrides, file in ((None, str(base)), (["model.sparsity.m=24"], OVERRIDES)):
        with pytest.raises(RecipeError) as info:
            zoo.build(zoo.load_recipe(child, overrides), device="meta")
        assert (info.value.file, info.value.path) == (file, "model.sparsity.m")
        assert "does not divide the projection input width 64" in info.value.reason
    from zoo.train.loop import train

    with pytest.raises(RecipeError) as info:  # checked before the run folder is made
        train(zoo.load_recipe(child, ["model.sparsity.m=16", "train.seq_len=9999"]), child.parent / "run")
    assert (info.value.file, info.value.path) == (OVERRIDES, "train.seq_len")
    assert not (child.parent / "run").exists()


def test_kind_given_as_string_and_default_kind_kept(recipe_file):
    r = zoo.load_recipe(recipe_file('[model]\nffn = "mlp"\nnorm = "layernorm"\n'))
    assert r.model.ffn.kind == "mlp" and r.model.ffn.config.activation.kind == "gelu"
    r = zoo.load_recipe(recipe_file("[model.ffn]\nhidden = 77\n"))
    assert r.model.ffn.kind == "glu" and r.model.ffn.config.hidden == 77


def test_roles_fall_back_to_parent(recipe_file):
    r = zoo.load_recipe(recipe_file('[model.weights]\ndtype = "float16"\n[model.weights.roles]\n'
                                    'down = { dtype = "bfloat16" }\n'))
    w = r.model.weights
    assert w.for_role("qkv").config.dtype == "float16"
    assert w.for_role("down").config.dtype == "bfloat16"
    assert w.for_role("expert_down").config.dtype == "bfloat16"
    assert w.for_role("expert_up_gate").config.dtype == "float16"


def test_layer_patterns(recipe_file):
    r = zoo.load_recipe(recipe_file(
        '[model]\nn_layers = 6\n[model.ffn]\nhidden = 128\n'
        '[[model.layers]]\nrange = "0"\nffn = { kind = "mlp", hidden = 64 }\n'
        '[[model.layers]]\nrange = "2-"\nevery = 2\nffn = { hidden = 256 }\n'
        '[[model.layers]]\nrange = "5"\nnorm = "layernorm"\n'))
    m = r.model
    kinds = [(m.layer(i)["ffn"].kind, m.layer(i)["ffn"].config.hidden) for i in range(6)]
    assert kinds == [("mlp", 64), ("glu", 128), ("glu", 256), ("glu", 128), ("glu", 256), ("glu", 128)]
    assert [m.layer(i)["norm"].kind for i in range(6)] == ["rmsnorm"] * 5 + ["layernorm"]
    # same kind: merged over the model-wide block (activation kept); layer patterns list their layers
    assert m.layer(2)["ffn"].config.activation.kind == "silu"
    assert m.layers[1].layers(6) == [2, 4] and m.layers[0].layers(6) == [0]


def test_layer_pattern_all_and_later_wins(recipe_file):
    m = zoo.load_recipe(recipe_file(
        '[[model.layers]]\nrange = "all"\nffn = "mlp"\n[[model.layers]]\nrange = "1"\nffn = { hidden = 32 }\n')).model
    assert [m.layer(i)["ffn"].kind for i in range(4)] == ["mlp", "glu", "mlp", "mlp"]
    assert m.layer(1)["ffn"].config.hidden == 32


# recipes/retrofit/ extends a catalogue model (needs its plugin and weights): tests/test_smollm2.py round-trips those
@pytest.mark.parametrize("recipe", sorted(p.relative_to(RECIPES).as_posix() for p in RECIPES.rglob("*.toml")
                                          if p.parent.name != "retrofit"))
def test_shipped_recipes_round_trip(recipe, tmp_path):
    r = zoo.load_recipe(RECIPES / recipe)
    out = tmp_path / "resolved.toml"
    out.write_text(r.to_toml())
    again = zoo.load_recipe(out)
    assert again == r and again.to_toml() == r.to_toml()


def test_round_trip_with_patterns_roles_and_overrides(recipe_file, tmp_path):
    path = recipe_file('[model.weights.roles]\ndown = { dtype = "bfloat16" }\n'
                       '[[model.layers]]\nrange = "1-2"\nffn = { kind = "mlp", activation = "relu" }\n')
    r = zoo.load_recipe(path, ["model.head_dim=32", "model.n_kv_heads=2"])
    assert zoo.loads_recipe(r.to_toml()) == r
    assert r.replace(**{"model.n_layers": 5}).model.n_layers == 5


def test_paper_family_shapes():
    shapes = {name: zoo.load_recipe(RECIPES / f"paper/{name}.toml").model
              for name in ("300m", "700m", "1.3b", "7b")}
    got = {n: (m.d_model, m.ffn.config.hidden, m.n_layers, m.vocab_size) for n, m in shapes.items()}
    assert got == {"300m": (1024, 2730, 24, 32000), "700m": (1536, 4096, 24, 32000),
                   "1.3b": (2048, 5460, 24, 32000), "7b": (4096, 11008, 32, 32000)}
    assert all(m.head_size in (64, 128) and not m.tie_embeddings for m in shapes.values())


def test_loads_recipe_rejects_extends_and_bad_toml():
    with pytest.raises(RecipeError, match="extends needs a file"):
        zoo.loads_recipe('extends = "x.toml"\n')
    with pytest.raises(RecipeError, match="line 1"):
        zoo.loads_recipe("[model\n")


def test_round_trip_property():
    """Any valid combination of shapes, blocks, roles and layer patterns survives to_toml -> load."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(heads=st.sampled_from([(4, 1), (4, 2), (4, 4), (6, 3)]), width=st.integers(1, 4),
           layers=st.integers(1, 5), ffn=st.sampled_from(["glu", "mlp"]),
           act=st.sampled_from(["silu", "gelu", "relu"]), tie=st.booleans(),
           dtype=st.sampled_from(["float32", "bfloat16"]), role=st.sampled_from([None, "down", "qkv", "expert_down"]),
           pattern=st.one_of(st.none(), st.tuples(st.integers(0, 4), st.sampled_from(["glu", "mlp"]),
                                                  st.integers(8, 64))),
           name=st.text(max_size=8))
    def check(heads, width, layers, ffn, act, tie, dtype, role, pattern, name):
        h, kv = heads
        data = {"name": name, "model": {
            "d_model": 16 * h * width, "n_heads": h, "n_kv_heads": kv, "n_layers": layers, "tie_embeddings": tie,
            "dtype": dtype, "ffn": {"kind": ffn, "activation": act},
            "weights": {"kind": "fp", **({"roles": {role: {"dtype": "float16"}}} if role else {})}}}
        if pattern is not None:
            data["model"]["layers"] = [{"range": f"{min(pattern[0], layers - 1)}-",
                                        "ffn": {"kind": pattern[1], "hidden": pattern[2]}}]
        recipe = zoo.recipe.recipe_from_dict(data)
        again = zoo.loads_recipe(recipe.to_toml())
        assert again == recipe and again.to_toml() == recipe.to_toml()

    check()
