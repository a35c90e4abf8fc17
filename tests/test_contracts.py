"""zoo/contracts.py: a block that breaks its slot's contract is refused at build time in one line naming the
plugin, the slot and kind, and the missing member; what the core does comes from what blocks declare."""

import math
import types
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import zoo
from tests.conftest import tiny
from zoo.contracts import FFN, KernelBackend, Sparsity, Weights
from zoo.data import build_corpus
from zoo.errors import PluginError
from zoo.eval.sparsity import measure_sparsity
from zoo.model.projection import Projection


@dataclass(frozen=True)
class Plain:
    """no fields"""


class NoForward(Sparsity):
    """A sparsity block that forgot its forward."""


class NoGroupedMM(KernelBackend):
    """A backend that forgot its matmul."""


class PlainLinear(nn.Linear, Weights):
    """nn.Linear as a weights block."""


class Lines:
    """A dataset that does not subclass zoo.contracts.Corpus."""

    def chunks(self):
        yield "a line\n"


class OutFFN(FFN):
    """down(relu(up(x))) with the output projection called `out` and the inner ones of a plugin role `mix`
    (declared as writing to the residual) and `inner` (a child of up_gate)."""

    def __init__(self, cfg, ctx, d_model: int):
        super().__init__()
        self.hidden = 4 * d_model
        self.up = ctx.projection("inner", d_model, self.hidden)
        self.out = ctx.projection("down", self.hidden, d_model)
        self.side = ctx.projection("mix", d_model, d_model)

    def forward(self, x):
        return self.out(torch.relu(self.up(x))) + self.side(x)


def plugin(name: str, *registrations) -> types.ModuleType:
    def register(registry):
        registry.add_role("inner", parent="up_gate")
        registry.add_role("mix", residual=True)
        for slot, kind, factory in registrations:
            registry.register(slot, kind, Plain, factory)

    module = types.ModuleType(name)
    module.zoo_register = zoo.hookimpl(register)
    return module


@pytest.fixture
def registry(plugin_registry):
    return plugin_registry(("contractual", plugin(
        "contractual",
        ("weights", "bare", lambda cfg, ctx, i, o, bias: nn.Linear(i, o, bias)),
        ("weights", "plain", lambda cfg, ctx, i, o, bias: PlainLinear(i, o, bias)),
        ("sparsity", "noforward", lambda cfg, ctx, width: NoForward()),
        ("kernel-backend", "nomm", lambda cfg, ctx: NoGroupedMM()),
        ("ffn", "out", OutFFN),
        ("dataset", "lines", lambda cfg, source: Lines()),
    )))


@pytest.mark.parametrize("override,member", [
    ("model.weights.kind='bare'", "model.weights breaks the weights contract (zoo/contracts.py): Linear is not a "
                                  "zoo.contracts.Weights subclass (it has no sparsify_inside, operands"),
    ("model.sparsity.kind='noforward'", "model.sparsity breaks the sparsity contract (zoo/contracts.py): "
                                        "NoForward defines no forward"),
    ("model.ffn={kind='moe', num_experts=2, top_k=1, expert={kind='glu', hidden=8}, backend='nomm'}",
     "model.ffn.backend breaks the kernel-backend contract (zoo/contracts.py): NoGroupedMM defines no grouped_mm"),
])
def test_a_block_breaking_its_contract_is_refused_in_one_line(registry, override, member):
    with pytest.raises(PluginError) as info:
        zoo.build(tiny(override))
    msg = str(info.value)
    assert msg.startswith("plugin 'contractual' (") and member in msg and "\n" not in msg, msg


def test_a_dataset_breaking_its_contract_is_refused(registry):
    with pytest.raises(PluginError, match=r"^plugin 'contractual' \(.*\): dataset.lines at data.dataset breaks the "
                                          r"dataset contract \(zoo/contracts.py\): Lines is not a "
                                          r"zoo.contracts.Corpus subclass \(it has no name, fingerprint\)$"):
        build_corpus(tiny("data.dataset={kind='lines'}"))


def test_a_subclass_with_only_forward_gets_every_default(registry):
    model = zoo.build(tiny("model.weights.kind='plain'")).eval()
    proj = model.blocks[0].attn.qkv
    assert isinstance(proj.linear, PlainLinear) and proj.linear.operands is None and not proj.linear.freezable
    x = torch.randn(2, 3, 48, dtype=torch.float64)
    q, k, v = proj.double().split(x, (48, 48, 48))  # no operands: one forward, split
    torch.testing.assert_close(torch.cat([q, k, v], -1), x @ proj.linear.weight.t())
    zoo.kernels.prepare_inference(model)  # the default inference form is the block itself
    assert isinstance(model.blocks[0].attn.qkv.linear, PlainLinear)


def test_init_scaling_follows_the_role_not_the_module_name(registry):
    """An FFN whose output projection is called `out` (role down) is scaled by 1/sqrt(2L); so is a plugin role
    declared residual; a plugin role under up_gate inherits its parent's (not residual)."""
    assert registry.roles["inner"] == "up_gate" and registry.residual["mix"] is True
    assert registry.writes_residual("expert_down") and not registry.writes_residual("inner")
    torch.manual_seed(0)
    model = zoo.build(tiny("model.ffn={kind='out'}", "model.n_layers=8"))
    std = model.config.init_std
    ffn = model.blocks[0].ffn
    deep = std / math.sqrt(2 * 8)
    assert (ffn.out.residual, ffn.side.residual, ffn.up.residual) == (True, True, False)
    assert ffn.out.linear.weight.std().item() == pytest.approx(deep, rel=0.05)
    assert ffn.side.linear.weight.std().item() == pytest.approx(deep, rel=0.05)
    assert ffn.up.linear.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.blocks[0].attn.o.linear.weight.std().item() == pytest.approx(deep, rel=0.05)
    assert model.blocks[0].attn.qkv.linear.weight.std().item() == pytest.approx(std, rel=0.05)


def test_sparsity_statistics_come_from_the_projections_declarations(registry):
    """Layer and base role are what the projection factory recorded; a plugin role folds into its parent's."""
    model = zoo.build(tiny("model.ffn={kind='out'}", "model.sparsity.kind='topk'", "model.sparsity.keep=0.25"))
    table = measure_sparsity(model, [torch.randint(0, 256, (2, 8))])
    sites = {n: s for n, s in table.sites.items()}
    assert sites["blocks.1.ffn.up"].layer == 1 and sites["blocks.1.ffn.up"].base_role == "up_gate"
    assert table.by_role(base=False)["inner"] == pytest.approx(0.75)
    assert set(table.by_role()) == {"qkv", "o", "up_gate", "down", "mix"}
    projections = [m for m in model.modules() if isinstance(m, Projection)]
    assert {p.layer for p in projections} == {0, 1}
