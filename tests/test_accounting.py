"""Parameter and FLOP accounting against numbers computed by hand for one shape."""

import types
from dataclasses import dataclass

import pytest
from torch import nn

import zoo

# tiny(): d=48, 2 layers, 4 heads of 12, vocab 256, GLU hidden 96, tied head, context 64.
D, L, H, HD, V, F, T = 48, 2, 4, 12, 256, 96, 64


def test_dense_tiny_by_hand(tiny_recipe):
    acc = zoo.account(zoo.build(tiny_recipe(), device="meta"))
    qkv, o, up_gate, down = D * 3 * D, D * D, D * 2 * F, F * D
    per_layer = qkv + o + up_gate + down + 2 * D  # + two RMSNorm gains
    assert acc.by_role == {"qkv": {"params": L * qkv, "activated": L * qkv}, "o": {"params": L * o, "activated": L * o},
                           "up_gate": {"params": L * up_gate, "activated": L * up_gate},
                           "down": {"params": L * down, "activated": L * down}}
    assert acc.non_embedding_params == L * per_layer + D == 46320
    assert acc.embedding_params == V * D == 12288
    assert acc.total_params == 58608 == sum(p.numel() for p in zoo.build(tiny_recipe()).parameters())
    assert acc.activated_params == acc.non_embedding_params
    assert acc.projection_params == acc.activated_projection_params == L * (qkv + o + up_gate + down)
    # forward FLOPs/token: 2 per projection weight, 2·d·V for the head, 4·L·T·H·hd for scores and mixing
    assert acc.flops_per_token == 2 * 46080 + 2 * D * V + 4 * L * T * H * HD == 141312
    assert acc.sparsity == 0.0 and acc.seq_len == T


def test_gqa_untied_and_seq_len(tiny_recipe):
    acc = zoo.account(zoo.build(tiny_recipe("model.n_kv_heads=2", "model.tie_embeddings=false"), device="meta"),
                      seq_len=10)
    assert acc.by_role["qkv"]["params"] == L * D * (H + 2 * 2) * HD
    assert acc.embedding_params == 2 * V * D
    assert acc.flops_per_token == 2 * acc.activated_projection_params + 2 * D * V + 4 * L * 10 * H * HD


@dataclass(frozen=True)
class HalfConfig:
    """keeps half of each input (for accounting tests)"""


class Half(nn.Identity, zoo.contracts.Sparsity):
    keep_fraction = 0.5


class Quarter(zoo.contracts.FFN):
    """Wraps the layer's FFN; as if each token reached one expert of four."""

    token_fraction = 0.25

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@dataclass(frozen=True)
class QuarterConfig:
    """an FFN used by a quarter of the tokens"""


def _register(registry):
    registry.register("sparsity", "half", HalfConfig, lambda cfg, ctx, width: Half())
    registry.register("ffn", "quarter", QuarterConfig, lambda cfg, ctx, d: Quarter(ctx.build(ctx.model.ffn, d)))


@pytest.fixture
def accounting_plugin(plugin_registry):
    module = types.ModuleType("accounting_plugin")
    module.zoo_register = zoo.hookimpl(_register)
    return plugin_registry(("accounting", module))


def test_keep_fraction_scales_activated_per_role(tiny_recipe, accounting_plugin):
    acc = zoo.account(zoo.build(tiny_recipe("model.sparsity.roles.down={kind='half'}"), device="meta"))
    assert acc.by_role["down"] == {"params": L * F * D, "activated": L * F * D * 0.5}
    assert acc.by_role["qkv"]["activated"] == acc.by_role["qkv"]["params"]
    assert acc.activated_params == acc.non_embedding_params - L * F * D * 0.5
    assert acc.sparsity == pytest.approx(L * F * D * 0.5 / acc.projection_params)


def test_token_fraction_scales_everything_below(tiny_recipe, accounting_plugin):
    dense = zoo.account(zoo.build(tiny_recipe(), device="meta"))
    acc = zoo.account(zoo.build(tiny_recipe("model.layers=[{range='1', ffn='quarter'}]"), device="meta"))
    ffn = D * 2 * F + F * D
    assert acc.total_params == dense.total_params
    assert acc.activated_params == dense.activated_params - 0.75 * ffn
    assert acc.flops_per_token == dense.flops_per_token - 2 * 0.75 * ffn
