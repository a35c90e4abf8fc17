"""The dense decoder: a float64 reference forward, loss/backward, KV-cache decoding, generation, meta build."""

import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.model.transformer import sample


def reference_logits(model, idx, sd=None):
    """The LLaMA-style forward written out plainly in float64 from the model's weights (or the tensors `sd`)."""
    cfg = model.config
    sd = sd or {k: v.double() for k, v in model.state_dict().items()}
    h, kv, hd = cfg.n_heads, cfg.kv_heads, cfg.head_size
    T = idx.shape[1]

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w

    inv = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos(), ang.sin()

    def rope(x):  # pairs (i, i + hd/2)
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    x = sd["embed.weight"][idx]
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        a = rms(x, sd[p + "attn_norm.weight"])
        qkv = a @ sd[p + "attn.qkv.linear.weight"].T
        q, k, v = qkv.split([h * hd, kv * hd, kv * hd], -1)
        q = rope(q.view(*q.shape[:2], h, hd).transpose(1, 2))
        k = rope(k.view(*k.shape[:2], kv, hd).transpose(1, 2)).repeat_interleave(h // kv, 1)
        v = v.view(*v.shape[:2], kv, hd).transpose(1, 2).repeat_interleave(h // kv, 1)
        s = q @ k.transpose(-1, -2) / math.sqrt(hd)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (s.softmax(-1) @ v).transpose(1, 2).reshape(*x.shape[:2], h * hd)
        x = x + y @ sd[p + "attn.o.linear.weight"].T
        f = rms(x, sd[p + "ffn_norm.weight"])
        gate, up = (f @ sd[p + "ffn.up_gate.linear.weight"].T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ sd[p + "ffn.down.linear.weight"].T
    return rms(x, sd["norm.weight"]) @ sd["head.weight"].T


@pytest.mark.parametrize("overrides", [[], ["model.n_kv_heads=2", "model.d_model=40", "model.n_heads=4",
                                            "model.ffn.hidden=72"]])
def test_forward_matches_float64_reference(tiny_recipe, overrides):
    torch.manual_seed(1)
    model = zoo.build(tiny_recipe(*overrides)).double()
    idx = torch.randint(0, 256, (3, 17))
    got = model(idx).logits
    torch.testing.assert_close(got, reference_logits(model, idx), rtol=1e-10, atol=1e-10)


def test_gradients_match_float64_reference(tiny_recipe):
    """Backward through the split projections and the rolled RoPE equals autograd through the plain reference."""
    torch.manual_seed(2)
    model = zoo.build(tiny_recipe("model.n_kv_heads=2", "model.ffn.hidden=72", "model.tie_embeddings=false")).double()
    idx = torch.randint(0, 256, (2, 13))
    probe = torch.randn(2, 13, 256, dtype=torch.float64)
    (model(idx).logits * probe).sum().backward()
    sd = {k: v.detach().clone().requires_grad_() for k, v in model.state_dict().items()}
    (reference_logits(model, idx, sd) * probe).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, sd[name].grad, rtol=1e-10, atol=1e-10, msg=name)


def test_loss_backward_finite_and_reaches_every_parameter(tiny_model):
    idx = torch.randint(0, 256, (2, 19))
    out = tiny_model(idx[:, :-1], idx[:, 1:])
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert abs(out.loss.item() - math.log(256)) < 0.5  # near-uniform at init
    out.total_loss.backward()
    for name, p in tiny_model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_cross_entropy_ignores_minus_one(tiny_model):
    idx = torch.randint(0, 256, (2, 9))
    targets = idx.clone()
    targets[:, 4:] = -1
    full = tiny_model(idx[:, :4], idx[:, :4]).logits
    loss = tiny_model(idx, targets).loss
    torch.testing.assert_close(loss, F.cross_entropy(full.flatten(0, 1), idx[:, :4].flatten()))


@pytest.mark.parametrize("overrides", [[], ["model.n_kv_heads=1"], ["model.ffn.kind=mlp", "model.position=none"]])
def test_kv_cache_decoding_equals_full_forward(tiny_recipe, overrides):
    torch.manual_seed(2)
    model = zoo.build(tiny_recipe(*overrides)).double().eval()
    idx = torch.randint(0, 256, (2, 23))
    full = model(idx).logits
    cache = model.new_cache(2)
    steps = [model(idx[:, :7], cache=cache).logits]  # prefill, then one token at a time
    for t in range(7, 23):
        steps.append(model(idx[:, t:t + 1], cache=cache, start=t).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)


def test_chunked_prefill_with_cache(tiny_model):
    tiny_model.eval()
    idx = torch.randint(0, 256, (1, 30))
    cache = tiny_model.new_cache(1)
    parts = [tiny_model(idx[:, a:b], cache=cache, start=a).logits for a, b in ((0, 10), (10, 21), (21, 30))]
    torch.testing.assert_close(torch.cat(parts, 1), tiny_model(idx).logits, rtol=1e-5, atol=1e-5)


def test_greedy_generate_equals_no_cache_argmax(tiny_recipe):
    torch.manual_seed(3)
    model = zoo.build(tiny_recipe()).double().eval()
    prompt = torch.randint(0, 256, (2, 5))
    got = torch.cat(list(model.generate(prompt, 6, temperature=0)), 1)
    seq = prompt
    for _ in range(6):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(got, seq[:, 5:])


def test_generate_stops_at_max_seq_len(tiny_model):
    out = list(tiny_model.generate(torch.zeros(1, 60, dtype=torch.long), 100, temperature=0))
    assert len(out) == 5  # positions 60..63 fed back, plus the token predicted at the last one


def test_sequence_longer_than_context_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        tiny_model(torch.zeros(1, 65, dtype=torch.long))


def test_sample_top_k_and_top_p():
    logits = torch.tensor([[0.0, 5.0, 4.0, -3.0]])
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits.repeat(200, 1), 1.0, top_k=2, generator=g).flatten().tolist()) <= {1, 2}
    assert set(sample(logits.repeat(200, 1), 1.0, top_p=0.5, generator=g).flatten().tolist()) == {1}
    assert sample(logits, 0.0).item() == 1


def test_tied_and_untied_heads(tiny_recipe):
    tied = zoo.build(tiny_recipe())
    assert tied.head.weight is tied.embed.weight
    untied = zoo.build(tiny_recipe("model.tie_embeddings=false"))
    assert untied.head.weight is not untied.embed.weight


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_model_dtype_and_pinned_projection_dtype(tiny_recipe, dtype, torch_dtype):
    model = zoo.build(tiny_recipe(f"model.dtype={dtype!r}", "model.weights.roles.down={dtype='float32'}"))
    assert model.embed.weight.dtype == torch_dtype
    assert model.blocks[0].ffn.down.linear.weight.dtype == torch.float32
    assert model.blocks[0].ffn.up_gate.linear.weight.dtype == torch_dtype
    out = model(torch.randint(0, 256, (1, 8)), torch.randint(0, 256, (1, 8)))
    assert out.logits.dtype == torch_dtype and torch.isfinite(out.loss)


def test_layer_patterns_build_different_blocks(tiny_recipe):
    model = zoo.build(tiny_recipe("model.layers=[{range='0', ffn={kind='mlp', hidden=40}}]"))
    assert type(model.blocks[0].ffn).__name__ == "MLP" and model.blocks[0].ffn.hidden == 40
    assert type(model.blocks[1].ffn).__name__ == "GLU" and model.blocks[1].ffn.hidden == 96


def test_meta_build_allocates_nothing(tiny_recipe):
    model = zoo.build(tiny_recipe("model.d_model=4096", "model.n_heads=32", "model.ffn.hidden=11008"), device="meta")
    assert all(p.is_meta for p in model.parameters())


def test_init_std_and_scaled_output_projections(tiny_recipe):
    torch.manual_seed(0)
    model = zoo.build(tiny_recipe("model.d_model=256", "model.ffn.hidden=512", "model.n_layers=8"))
    assert model.blocks[0].attn.qkv.linear.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].ffn.down.linear.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)


@pytest.mark.parametrize("dtype, wdtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                           (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("per_row", [False, True])
def test_rms_norm_backward_equals_autograd_of_the_plain_expression(dtype, wdtype, per_row):
    """rms_norm's written-out backward against autograd through x·rsqrt(mean(x²)+eps) (statistics in fp32+)."""
    from zoo.blocks.norm import rms_norm

    torch.manual_seed(3)
    x = (torch.randn(5, 3, 37, dtype=torch.float64) * 3).to(dtype)
    w = (torch.rand(*((5, 3, 37) if per_row else (37,)), dtype=torch.float64) + 0.5).to(wdtype)
    g = torch.randn(5, 3, 37, dtype=torch.float64).to(torch.promote_types(dtype, wdtype))

    def plain(x, w):
        xc = x.to(torch.promote_types(x.dtype, torch.float32))
        return (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w

    results = []
    for fn in (rms_norm, lambda x, w, eps: plain(x, w)):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xs, ws, 1e-5)
        y.backward(g)
        results.append((y, xs.grad, ws.grad))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, wdtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                           (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("per_row", [False, True])
def test_rms_norm_without_grad_equals_the_training_form(dtype, wdtype, per_row):
    """Under no_grad rms_norm may take torch's fused F.rms_norm: the values must not change."""
    from zoo.blocks.norm import _RMSNorm, rms_norm

    x = (torch.randn(4, 3, 41, dtype=torch.float64) * 3).to(dtype)
    w = (torch.rand(*((4, 3, 41) if per_row else (41,)), dtype=torch.float64) + 0.5).to(wdtype)
    with torch.no_grad():
        got, want = rms_norm(x, w, 1e-5), _RMSNorm.apply(x, w, 1e-5)
    assert got.dtype == want.dtype
    tol = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 0}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
