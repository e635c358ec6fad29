"""Direct logit attribution: the components add up to the model's own logit difference, and each head's value
equals a brute-force computation from its hooked per-head output and the cached final-norm scale."""

from __future__ import annotations

import pytest
import torch

from mechscope import InputError, zoo
from mechscope.circuits.dla import direct_logit_attribution
from mechscope.models.loading import from_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["when mary and john went to the store john gave a drink to", "the big cat sat on the mat and the dog",
         "she ran to the red house"]


def _prompts(model):
    tokens, mask = model.to_tokens(TEXTS, return_mask=True)  # right padded
    return tokens, mask


def _brute_force_heads(model, tokens, mask, pos, d):  # d: [D] or [B, D]
    """[B, L, H] from hook_result (the explicit per-head path of the forward) and ln_final.hook_scale:
    centre (LayerNorm) or not (RMSNorm), divide by the scale, times the norm weight, dotted with d."""
    c = model.cfg
    res, scale = {}, {}

    def grab(t, hook):
        res[hook.name] = t.detach()

    def grab_scale(t, hook):
        scale["s"] = t.detach()

    hooks = [(f"blocks.{la}.attn.hook_result", grab) for la in range(c.n_layers)]
    with torch.no_grad():
        model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks + [("ln_final.hook_scale", grab_scale)])
    rows = torch.arange(tokens.shape[0])
    out = torch.empty(tokens.shape[0], c.n_layers, c.n_heads)
    w = model.ln_final.w.detach() if model.ln_final.w is not None else torch.ones(c.d_model)
    for la in range(c.n_layers):
        r = res[f"blocks.{la}.attn.hook_result"][rows, pos].double()  # [B, H, D]
        if c.normalization == "LN":
            r = r - r.mean(-1, keepdim=True)
        r = r / scale["s"][rows, pos].double()[:, None]  # [B, 1, 1]
        out[:, la] = torch.einsum("bhd,bd->bh", r, (w.double() * d.double()).expand(len(rows), -1)).float()
    return out


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_sum_equals_logit_diff_and_heads_match_brute_force(fixture, request):
    model = request.getfixturevalue(fixture)[2]
    tokens, mask = _prompts(model)
    a, b = model.to_single_token("mary"), model.to_single_token("john")
    res = direct_logit_attribution(model, tokens, (a, b), attention_mask=mask)
    with torch.no_grad():
        logits = model(tokens, attention_mask=mask)
    last = mask.sum(-1) - 1  # right padding: last real token
    rows = torch.arange(len(TEXTS))
    want = logits[rows, last, a] - logits[rows, last, b]
    assert torch.equal(res.positions, last)
    torch.testing.assert_close(res.logit_diff, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.total(), want, atol=1e-4, rtol=0)
    # per-head values + b_O = the attention layer; the brute force agrees
    torch.testing.assert_close(res.heads.sum(-1) + res.attn_bias, res.attn, atol=1e-4, rtol=0)
    d = model.W_U[:, a] - model.W_U[:, b]
    torch.testing.assert_close(res.heads, _brute_force_heads(model, tokens, mask, last, d.detach()), atol=1e-4, rtol=0)
    # accumulated residual: ends at the total, starts at the embeddings
    acc = res.accumulated()
    assert acc.shape == (3, model.cfg.n_layers + 1)
    torch.testing.assert_close(acc[:, -1], res.total(), atol=1e-5, rtol=0)
    # neurons (+ MLP output biases) add up to each MLP layer, so the total stays exact
    neu = direct_logit_attribution(model, tokens, (a, b), attention_mask=mask, components="neurons")
    assert neu.neurons.shape == (3, model.cfg.n_layers, model.cfg.d_mlp) and neu.heads is None
    torch.testing.assert_close(neu.neurons.sum(-1) + neu.mlp_bias, neu.mlps, atol=1e-4, rtol=0)
    torch.testing.assert_close(neu.neurons.sum((-1, -2)) + neu.mlp_bias.sum(-1) + neu.embed + neu.pos_embed
                               + neu.attn.sum(-1) + neu.final_bias, want, atol=1e-4, rtol=0)
    # mean over prompts = mean of the per-prompt values
    m = res.mean()
    assert m.heads.shape == (model.cfg.n_layers, model.cfg.n_heads)
    torch.testing.assert_close(m.heads, res.heads.mean(0))
    assert len(res.top_heads(3)) == 3


@pytest.mark.slow  # the session's induction-2l fixture trains for ~1-2 min
def test_induction_zoo_model(induction_2l_folder):
    """Attention-only, LayerNorm, learned positions; a batch of repeated random sequences, where the induction
    head's direct contribution to the correct next token should dominate."""
    model = zoo.load(induction_2l_folder)
    bos = model.tokenizer.bos_token_id
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(10, model.cfg.d_vocab, (4, 12), generator=g)
    tokens = torch.cat([torch.full((4, 1), bos), seq, seq[:, :1]], 1)  # [4, 14]: the last token starts the repeat
    answer, wrong = seq[:, 1], seq[:, 2]  # induction predicts seq[:, 1] next
    res = direct_logit_attribution(model, tokens, (answer, wrong))
    with torch.no_grad():
        logits = model(tokens)[:, -1]
    want = logits.gather(-1, answer[:, None])[:, 0] - logits.gather(-1, wrong[:, None])[:, 0]
    torch.testing.assert_close(res.total(), want, atol=1e-4, rtol=0)
    assert res.mlps is None and res.heads.shape == (4, 2, model.cfg.n_heads)
    d = (model.W_U[:, answer] - model.W_U[:, wrong]).T.detach()  # [B, D]
    last = torch.full((4,), tokens.shape[1] - 1)
    torch.testing.assert_close(res.heads, _brute_force_heads(model, tokens, None, last, d), atol=1e-4, rtol=0)
    mean = res.mean()
    assert float(mean.logit_diff) > 1  # the model predicts the repeat
    assert mean.heads[1].sum() > 0.5 * mean.logit_diff and mean.heads[1].sum() > mean.heads[0].sum()  # layer 1 writes it


def test_processed_model_gives_the_same_head_attribution(tiny_gpt2):
    """fold_ln / centring move the norm weight into W_U and shift means: the direct effects do not change
    (fold_value_biases would move b_V into b_O, so it is left out)."""
    _, folder, raw = tiny_gpt2
    proc = from_pretrained(str(folder)).process_weights(fold_value_biases=False)
    assert proc.ln_final.w is None
    tokens, mask = _prompts(raw)
    target = (raw.to_single_token("mary"), raw.to_single_token("john"))
    r1 = direct_logit_attribution(raw, tokens, target, attention_mask=mask)
    r2 = direct_logit_attribution(proc, tokens, target, attention_mask=mask)
    torch.testing.assert_close(r2.heads, r1.heads, atol=1e-4, rtol=0)
    torch.testing.assert_close(r2.mlps, r1.mlps, atol=1e-4, rtol=0)
    torch.testing.assert_close(r2.total(), r2.logit_diff, atol=1e-4, rtol=0)


def test_direction_and_single_answer_targets(tiny_llama):
    model = tiny_llama[2]
    tokens = model.to_tokens("the cat sat on the mat")
    a = model.to_single_token("dog")
    res = direct_logit_attribution(model, tokens, a, position=3)
    with torch.no_grad():
        logits = model(tokens)
    torch.testing.assert_close(res.total(), logits[:, 3, a], atol=1e-4, rtol=0)
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    res = direct_logit_attribution(model, tokens, direction, components=("embed", "attn", "mlps"))
    _, cache = model.run_with_cache(tokens, names_filter="ln_final.hook_normalized")
    want = cache["ln_final.hook_normalized"][:, -1] @ direction
    torch.testing.assert_close(res.logit_diff, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.total(), want, atol=1e-4, rtol=0)
    assert res.heads is None and res.neurons is None


def test_bad_inputs(tiny_llama):
    model = tiny_llama[2]
    tokens = model.to_tokens("the cat sat")
    with pytest.raises(InputError, match="components"):
        direct_logit_attribution(model, tokens, 5, components=("heads", "layers"))
    with pytest.raises(InputError, match="tokens"):
        direct_logit_attribution(model, tokens, "the cat")  # not one token
    with pytest.raises(InputError, match="outside"):
        direct_logit_attribution(model, tokens, 5, position=40)
    with pytest.raises(InputError, match="shape"):
        direct_logit_attribution(model, tokens, torch.ones(7))
    with pytest.raises(InputError, match="prompts"):
        direct_logit_attribution(model, tokens, ([1, 2], 3))
