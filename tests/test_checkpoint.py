"""zoo.save / zoo.load: bit-exact round trip, atomic writes, and one clear error per corruption."""

import json
import pickle
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo
from zoo.errors import CheckpointError
from zoo.io.checkpoint import sha256


@pytest.fixture
def saved(tiny_recipe, tmp_path):
    torch.manual_seed(0)
    model = zoo.build(tiny_recipe("model.tie_embeddings=true"))
    return model, zoo.save(model, tmp_path / "ckpt")


def rewrite(path, tensors):
    """Replace the weights file and re-sign it, so only the content is wrong."""
    save_file(tensors, str(path / "model.safetensors"))
    meta = json.loads((path / "meta.json").read_text())
    meta["sha256"] = sha256(path / "model.safetensors")
    (path / "meta.json").write_text(json.dumps(meta))


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        zoo.load(path)
    return str(info.value)


def test_round_trip_is_bit_exact(saved, monkeypatch):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "recipe.toml"]

    def no_pickle(*a, **k):
        raise AssertionError("pickle used while loading")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = zoo.load(path)
    assert loaded.recipe == model.recipe
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert loaded.head.weight is loaded.embed.weight  # still tied
    idx = torch.randint(0, 256, (2, 11))
    assert torch.equal(model(idx).logits, loaded(idx).logits)


def test_tied_head_stored_once_and_meta(saved):
    model, path = saved
    assert "head.weight" not in load_file(path / "model.safetensors")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["aliases"] == {"head.weight": "embed.weight"}
    assert meta["zoo_version"] == zoo.__version__ and meta["sha256"] == sha256(path / "model.safetensors")
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())
    assert zoo.load_recipe(path / "recipe.toml") == model.recipe


def test_untied_bf16_round_trip(tiny_recipe, tmp_path):
    model = zoo.build(tiny_recipe("model.tie_embeddings=false", "model.dtype='bfloat16'"))
    loaded = zoo.load(zoo.save(model, tmp_path / "c"))
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.head.weight, model.head.weight) and loaded.head.weight is not loaded.embed.weight


def test_save_replaces_old_checkpoint_atomically(saved, tiny_recipe, monkeypatch):
    model, path = saved
    import zoo.io.checkpoint as ckpt

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(CheckpointError, match="No space left on device"):
        zoo.save(zoo.build(tiny_recipe()), path)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]  # no temporary left behind
    assert torch.equal(zoo.load(path).embed.weight, model.embed.weight)  # the old one intact
    monkeypatch.undo()
    other = zoo.build(tiny_recipe())
    zoo.save(other, path)
    assert torch.equal(zoo.load(path).embed.weight, other.embed.weight)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


def test_save_refuses_to_replace_a_non_checkpoint(tiny_model, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a zoo checkpoint folder"):
        zoo.save(tiny_model, tmp_path / "notes")
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="meta device"):
        zoo.save(zoo.build(tiny_model.recipe, device="meta"), tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with pytest.raises(CheckpointError, match="no .recipe"):
        zoo.save(torch.nn.Linear(2, 2), tmp_path / "x")


def test_missing_folder_and_files(saved, tmp_path):
    _, path = saved
    assert "no such checkpoint or run folder" in load_error(tmp_path / "nope")
    for name in ("model.safetensors", "recipe.toml", "meta.json"):
        (path / name).rename(path / (name + ".bak"))
        assert f"missing {name}" in load_error(path)
        (path / (name + ".bak")).rename(path / name)


def test_hash_mismatch(saved):
    _, path = saved
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    msg = load_error(path)
    assert "model.safetensors: sha256" in msg and "does not match meta.json" in msg


def test_wrong_shape(saved):
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    tensors["blocks.0.ffn.down.linear.weight"] = torch.zeros(48, 95)
    rewrite(path, tensors)
    msg = load_error(path)
    assert "'blocks.0.ffn.down.linear.weight'" in msg and "(48, 95)" in msg and "(48, 96)" in msg


def test_wrong_dtype(saved):
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    tensors["norm.weight"] = tensors["norm.weight"].half()
    rewrite(path, tensors)
    assert "'norm.weight' is torch.float16" in load_error(path)


def test_unexpected_and_missing_tensor(saved):
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    rewrite(path, {**tensors, "blocks.0.extra": torch.zeros(3)})
    assert "unexpected tensor 'blocks.0.extra'" in load_error(path)
    del tensors["blocks.1.attn.o.linear.weight"]
    rewrite(path, tensors)
    assert "missing tensor 'blocks.1.attn.o.linear.weight'" in load_error(path)


def test_truncated_safetensors(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    meta = json.loads((path / "meta.json").read_text())
    meta["sha256"] = sha256(path / "model.safetensors")
    (path / "meta.json").write_text(json.dumps(meta))
    assert "unreadable safetensors file" in load_error(path)


def test_unbuildable_recipe(saved):
    _, path = saved
    text = (path / "recipe.toml").read_text()
    (path / "recipe.toml").write_text(text.replace('kind = "glu"', 'kind = "moe_from_the_future"'))
    msg = load_error(path)
    assert "its recipe cannot be built here" in msg and "model.ffn.kind" in msg and "moe_from_the_future" in msg


def test_an_edited_recipe_loads_with_one_line_naming_the_changed_keys(tiny_recipe, tmp_path):
    torch.manual_seed(0)
    model = zoo.build(tiny_recipe("model.sparsity.kind=topk", "model.sparsity.keep=0.5"))
    path = zoo.save(model, tmp_path / "ckpt")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["recipe_sha256"] == sha256(path / "recipe.toml") and meta["recipe"] == json.loads(
        json.dumps(model.recipe.to_dict()))
    text = (path / "recipe.toml").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zoo.load(path)  # unchanged: no word
        (path / "recipe.toml").write_text("# a comment changes the bytes, not the recipe\n" + text)
        zoo.load(path)
    (path / "recipe.toml").write_text(text.replace("keep = 0.5", "keep = 0.3"))
    with pytest.warns(UserWarning) as caught:
        edited = zoo.load(path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "recipe.toml differs from the recipe the weights were saved with" in message
    assert "model.sparsity.keep: 0.5 -> 0.3" in message and "\n" not in message
    assert edited.recipe.model.sparsity.config.keep == 0.3  # loaded as it is now


def test_load_accepts_a_run_folder_and_short_step_names(tmp_path):
    from tests.tiny import tiny_run
    from zoo.train.loop import train

    train(tiny_run(tmp_path, **{"train.steps": 2, "train.ckpt_every": 1, "train.keep_last": 2,
                                "train.eval_every": 0}), tmp_path / "run", progress=False)
    newest = zoo.load(tmp_path / "run")
    assert zoo.load(tmp_path / "run/checkpoints/step-2").state_dict().keys() == newest.state_dict().keys()
    assert torch.equal(zoo.load(tmp_path / "run/checkpoints/step-00000002").head.weight, newest.head.weight)
    assert not torch.equal(zoo.load(tmp_path / "run/checkpoints/step-1").head.weight, newest.head.weight)
    assert "no checkpoint step-7 (steps there: 1, 2)" in load_error(tmp_path / "run/checkpoints/step-7")
    assert "nor a run folder with checkpoints/step-N" in load_error(tmp_path)


def test_corrupt_meta(saved):
    _, path = saved
    (path / "meta.json").write_text("{not json")
    assert "meta.json: corrupt JSON" in load_error(path)
    (path / "meta.json").write_text(json.dumps({"format": 99, "sha256": "0"}))
    assert "checkpoint format 99" in load_error(path)
    (path / "meta.json").write_text(json.dumps({"format": 1}))
    assert "missing the 'sha256'" in load_error(path)
    (path / "meta.json").write_text(json.dumps({"format": 1, "sha256": "0", "aliases": ["head.weight"]}))
    assert "'aliases' must map" in load_error(path)
    (path / "meta.json").write_text(json.dumps({"format": 1, "sha256": "0", "transforms": "freeze"}))
    assert "'transforms' must be a list" in load_error(path)


def test_unknown_transform(saved):
    _, path = saved
    meta = json.loads((path / "meta.json").read_text())
    meta["transforms"] = ["freeze_everything"]
    (path / "meta.json").write_text(json.dumps(meta))
    assert "transform 'freeze_everything'" in load_error(path)


def test_transforms_replayed_after_build(tiny_recipe, tmp_path, monkeypatch):
    from zoo.model.transformer import Transformer

    def drop_final_norm(self):
        self.norm = torch.nn.Identity()

    monkeypatch.setattr(Transformer, "drop_final_norm", drop_final_norm, raising=False)
    monkeypatch.setattr(Transformer, "TRANSFORMS", (*Transformer.TRANSFORMS, "drop_final_norm"))
    model = zoo.build(tiny_recipe())
    model.drop_final_norm()
    model.zoo_transforms = ["drop_final_norm"]
    loaded = zoo.load(zoo.save(model, tmp_path / "t"))
    assert isinstance(loaded.norm, torch.nn.Identity)
