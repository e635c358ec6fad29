"""models.linearized: the frozen-prompt record replays the forward, and its VJPs equal autograd's through the
model with attention patterns and norm scales detached."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import UnsupportedArchitectureError
from mechscope.models import freeze_prompt


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_freeze_replays_and_vjp_matches_autograd(fixture, request):
    model = request.getfixturevalue(fixture)[2]
    tokens = model.to_tokens("the cat sat on the mat and ran")
    fp, logits = freeze_prompt(model, tokens)
    with torch.no_grad(), model.hooks(fp.freeze_hooks()):
        assert (model(tokens) - logits).abs().max() < 1e-5
    # attention sublayer of layer 1: residual before it -> what it adds, with pattern and scales detached
    captured = {}

    def det(act, hook):
        return act.detach()

    def grab(name):
        def fn(act, hook):
            if name == "x":
                act = act.detach().requires_grad_()
            captured[name] = act
            return act
        return fn

    hooks = [("blocks.*.attn.hook_pattern", det), (lambda n: n.endswith("hook_scale"), det),
             ("blocks.1.hook_resid_pre", grab("x")), ("blocks.1.hook_attn_out", grab("y"))]
    with torch.enable_grad(), model.hooks(hooks):
        model(tokens)
    g = torch.randn(3, tokens.shape[1], model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    ref = torch.stack([torch.autograd.grad(captured["y"][0], captured["x"], g[i], retain_graph=True)[0][0]
                       for i in range(3)])
    got = fp.attn_vjp(1, g)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    # a prefix of positions is exact for causal attention
    P = 4
    assert torch.allclose(fp.attn_vjp(1, g[:, :P]), fp.attn_vjp(1, torch.cat([g[:, :P], 0 * g[:, P:]], 1))[:, :P],
                          atol=1e-6)


def test_unsupported_architecture_is_typed():
    from mechscope import HookedTransformer, ModelConfig

    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=32, d_vocab=20, n_ctx=16, attn_only=True)
    model = HookedTransformer(cfg).init_weights(0)
    with pytest.raises(UnsupportedArchitectureError, match="attention-only"):
        freeze_prompt(model, torch.tensor([[1, 2, 3]]))
