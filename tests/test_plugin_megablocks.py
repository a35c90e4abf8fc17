"""The zoo-megablocks plugin: its clear errors on this machine (CPU), parity with zoo's MoE on CUDA."""

import importlib.util
import types
from dataclasses import dataclass

import pytest
import torch

import zoo
from tests.conftest import ROOT
from zoo.recipe.recipe import recipe_from_dict


def plugin_module():
    path = ROOT / "plugins/zoo-megablocks/zoo_megablocks/__init__.py"
    spec = importlib.util.spec_from_file_location("zoo_megablocks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PlainLinear(torch.nn.Linear, zoo.contracts.Weights):
    """nn.Linear as a weights block"""


@dataclass(frozen=True)
class PlainConfig:
    """a non-fp weights kind, standing in for BitNet"""


def registry_with_plugin():
    extra = types.ModuleType("otherweights")

    @zoo.hookimpl
    def zoo_register(registry):
        registry.register("weights", "other", PlainConfig, lambda cfg, ctx, i, o, b: PlainLinear(i, o, b))

    extra.zoo_register = zoo_register
    return zoo.registry.load_registry(extra=[("megablocks", plugin_module()), ("otherweights", extra)])


def moe_recipe(registry, **model):
    data = {"model": {"vocab_size": 16, "d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 8,
                      "ffn": {"kind": "moe", "num_experts": 4, "top_k": 2, "backend": "megablocks",
                              "expert": {"kind": "glu", "hidden": 128}}, **model}}
    return recipe_from_dict(data, source="moe.toml", registry=registry)


def test_plugin_registers_backend():
    registry = registry_with_plugin()
    assert registry.get("kernel-backend", "megablocks").plugin.name == "megablocks"


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("megablocks") is not None,
                    reason="megablocks is usable here")
def test_selecting_megablocks_without_cuda_is_one_clear_error():
    registry = registry_with_plugin()
    with pytest.raises(zoo.RecipeError) as err:
        zoo.build(moe_recipe(registry), registry=registry)
    assert str(err.value) == ('moe.toml:model.ffn.backend: megablocks backend needs CUDA and the megablocks '
                              'package; use backend = "auto"')


def test_megablocks_refuses_non_dense_expert_weights():
    registry = registry_with_plugin()
    recipe = moe_recipe(registry, weights={"kind": "fp", "roles": {"expert_down": {"kind": "other"}}})
    with pytest.raises(zoo.RecipeError, match=r"model\.ffn\.backend: megablocks backend refuses this layer: the "
                                              r"experts' weights are 'other' \(role expert_down\)"):
        zoo.build(recipe, registry=registry)


@pytest.mark.gpu
def test_megablocks_matches_zoo_moe_on_cuda():
    pytest.importorskip("megablocks")
    registry = registry_with_plugin()
    torch.manual_seed(0)
    mega = zoo.build(moe_recipe(registry, dtype="bfloat16"), registry=registry).cuda()
    ref = zoo.build(moe_recipe(registry, dtype="bfloat16", ffn={
        "kind": "moe", "num_experts": 4, "top_k": 2, "backend": "torch", "expert": {"kind": "glu", "hidden": 128}}),
        registry=registry).cuda()
    ref.load_state_dict(mega.state_dict())
    x = torch.randn(2, 7, 32, device="cuda", dtype=torch.bfloat16)
    moe_mega, moe_ref = mega.blocks[0].ffn, ref.blocks[0].ffn
    torch.testing.assert_close(moe_mega(x), moe_ref(x), rtol=2e-2, atol=2e-2)
