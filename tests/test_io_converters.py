"""Architecture converters are a registry slot: a plugin adds an architecture that `zoo convert hf` imports
and `zoo export hf --arch` writes, with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import zoo
from tests import toy_arch
from tests.conftest import tiny


@pytest.fixture
def toy(plugin_registry):
    return plugin_registry(("toy", toy_arch))


def toy_tensors(model) -> dict[str, torch.Tensor]:
    """The zoo model's weights under toyformer's names, sliced by hand (not by the converter's rules)."""
    sd, d = model.state_dict(), model.config.d_model
    out = {"tok.weight": sd["embed.weight"], "ln_out.weight": sd["norm.weight"]}
    for i in range(model.config.n_layers):
        h, z = f"h.{i}.", f"blocks.{i}."
        q, k, v = sd[z + "attn.qkv.linear.weight"].split(d)
        gate, up = sd[z + "ffn.up_gate.linear.weight"].chunk(2)
        out.update({h + "ln1.weight": sd[z + "attn_norm.weight"], h + "wq.weight": q, h + "wk.weight": k,
                    h + "wv.weight": v, h + "wo.weight": sd[z + "attn.o.linear.weight"],
                    h + "ln2.weight": sd[z + "ffn_norm.weight"], h + "w_gate.weight": gate, h + "w_up.weight": up,
                    h + "w_down.weight": sd[z + "ffn.down.linear.weight"]})
    return {name: t.contiguous().clone() for name, t in out.items()}


def toy_model():
    torch.manual_seed(0)
    model = zoo.build(tiny("model.tie_embeddings=true", "model.position.theta=5000.0", "model.norm.eps=1e-5"))
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1 so that a swapped tensor shows
            p.add_(torch.randn_like(p) * 0.1)
    return model


def toy_folder(path, model, **config):
    m = model.config
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "toyformer", "width": m.d_model, "depth": m.n_layers, "heads": m.n_heads,
        "mlp_width": m.ffn.config.hidden, "vocab": m.vocab_size, "context": m.max_seq_len, "norm_eps": 1e-5,
        "rope_base": 5000.0, **config}))
    save_file(toy_tensors(model), str(path / "model.safetensors"))
    return path


def logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx).logits


def test_plugin_architecture_imports_through_zoo_convert_hf(toy, tmp_path, cli):
    model = toy_model()
    src = toy_folder(tmp_path / "toy", model)
    r = cli("convert", "hf", src, tmp_path / "zoo")
    assert r.code == 0, r.err
    back = zoo.load(tmp_path / "zoo")
    assert json.loads((tmp_path / "zoo" / "meta.json").read_text())["source"]["model_type"] == "toyformer"
    idx = torch.randint(0, model.config.vocab_size, (2, 17))
    torch.testing.assert_close(logits(back, idx), logits(model, idx), rtol=0, atol=0)
    listed = cli("list", "converter")
    assert "converter.toyformer" in listed.out and "toy" in listed.out


def test_plugin_architecture_exports_with_its_own_names(toy, tmp_path, cli):
    model = toy_model()
    zoo.save(model, tmp_path / "zoo")
    r = cli("export", "hf", tmp_path / "zoo", tmp_path / "toy", "--arch", "toyformer")
    assert r.code == 0, r.err
    config = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert config["model_type"] == "toyformer" and config["mlp_width"] == model.config.ffn.config.hidden
    from safetensors.torch import load_file

    written, want = load_file(str(tmp_path / "toy" / "model.safetensors")), toy_tensors(model)
    assert written.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(written[name], want[name], rtol=0, atol=0)


def test_unknown_and_unwritable_architectures_list_the_plugin_one(toy, tmp_path, cli):
    model = toy_model()
    src = toy_folder(tmp_path / "toy", model, model_type="toyformr")
    r = cli("convert", "hf", src, tmp_path / "zoo")
    assert r.code == 2 and "did you mean \"toyformer\"" in r.err and "toyformer" in r.err.split("one of:")[1]
    zoo.save(model, tmp_path / "ck")
    r = cli("export", "hf", tmp_path / "ck", tmp_path / "out", "--arch", "toyformr")
    assert r.code == 2 and "did you mean \"toyformer\"" in r.err
    assert "one of: bitnet, llama, mistral, mixtral, olmoe, qwen2, qwen2_moe, toyformer" in r.err
    r = cli("export", "hf", tmp_path / "ck", tmp_path / "out", "--arch", "olmoe")  # a dense model
    assert r.code == 2 and "model.ffn.kind: the olmoe layout needs a 'moe' FFN" in r.err


def test_a_broken_plugin_converter_is_one_line_naming_the_plugin(toy, tmp_path, cli):
    src = toy_folder(tmp_path / "toy", toy_model(), depth="two")  # the plugin's int() raises ValueError
    r = cli("convert", "hf", src, tmp_path / "zoo")
    assert r.code == 2 and r.err.count("\n") == 1, r.err
    assert "plugin 'toy'" in r.err and "converter.toyformer" in r.err and "ValueError" in r.err
    assert not (tmp_path / "zoo").exists()


def test_gguf_architectures_come_from_the_converters():
    from zoo.io.gguf import layouts

    found = layouts()
    assert {key: (kind, layout.permute_qk) for key, (kind, layout) in found.items()} == {
        ("llama", False): ("llama", True), ("qwen2", False): ("qwen2", False), ("bitnet", False): ("bitnet", False),
        ("llama", True): ("mixtral", True), ("qwen2moe", True): ("qwen2_moe", False), ("olmoe", True): ("olmoe", False)}
    llama = found[("llama", False)][1]
    assert llama.gguf_name("model.layers.11.self_attn.k_proj.weight") == "blk.11.attn_k.weight"
    with pytest.raises(zoo.CheckpointError, match="no GGUF name for tensor 'model.layers.0.mlp.gate.weight'"):
        llama.gguf_name("model.layers.0.mlp.gate.weight")
    mixtral = found[("llama", True)][1]
    assert mixtral.slot("model.layers.3.block_sparse_moe.experts.5.w3.weight") == ("blk.3.ffn_up_exps.weight", 5)
