"""Shared parity checks against transformers: the ground truth for every family."""

from __future__ import annotations

import torch

LENGTHS = (11, 7, 4)  # a batch of 3 prompts of different lengths


def padded_batch(vocab: int, side: str, seed: int = 0, lengths=LENGTHS, low: int = 3):
    """Random token ids [3, T] and attention mask [3, T], padded on `side`."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    tokens = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids = torch.randint(low, vocab, (n,), generator=g)
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        tokens[i, sl], mask[i, sl] = ids, 1
    return tokens, mask


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens (what mechscope uses), passed explicitly to HF."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def logprob_diff(hf_model, model, vocab: int, side: str, seed: int = 0, hf_kwargs=None, **kw) -> float:
    """Max |log-softmax difference| over real (non-pad) positions, batch of 3 with padding."""
    tokens, mask = padded_batch(vocab, side, seed)
    ref = hf_model(tokens, attention_mask=mask, position_ids=hf_positions(mask), **(hf_kwargs or {})).logits
    ours = model(tokens, attention_mask=mask, **kw)
    diff = (torch.log_softmax(ref.float(), -1) - torch.log_softmax(ours.float(), -1)).abs()
    return float(diff[mask.bool()].max())


@torch.no_grad()
def hidden_state_diff(hf_model, model, vocab: int, side: str = "left", seed: int = 0) -> float:
    """Max |final hidden state difference| at real positions, for bare models without an unembedding."""
    tokens, mask = padded_batch(vocab, side, seed)
    ref = hf_model(tokens, attention_mask=mask, position_ids=hf_positions(mask)).last_hidden_state
    ours = model(tokens, attention_mask=mask, return_type="resid")
    return float((ref - ours).abs()[mask.bool()].max())


@torch.no_grad()
def batched_equals_single(model, vocab: int, side: str, seed: int = 0) -> float:
    """Max |logit difference| between a padded batch and each prompt run alone."""
    tokens, mask = padded_batch(vocab, side, seed)
    batched = model(tokens, attention_mask=mask)
    worst = 0.0
    for i in range(tokens.shape[0]):
        real = mask[i].bool()
        alone = model(tokens[i, real][None])[0]
        worst = max(worst, float((batched[i, real] - alone).abs().max()))
    return worst


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Perturb every parameter (norm weights and biases too) so that a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def check_parity(hf, ours, vocab: int, label: str) -> None:
    """Log-probs match HF (left and right padding), batched == single, from_hf == from_pretrained."""
    from mechscope.models.loading import from_hf

    for side in ("left", "right"):
        diff, single = logprob_diff(hf, ours, vocab, side), batched_equals_single(ours, vocab, side)
        print(f"{label} {side}: max |logprob diff| {diff:.2e}, batched vs single {single:.2e}")
        assert diff < 1e-4 and single < 1e-4
    tokens, mask = padded_batch(vocab, "left")
    with torch.no_grad():
        torch.testing.assert_close(from_hf(hf)(tokens, attention_mask=mask), ours(tokens, attention_mask=mask),
                                   rtol=0, atol=1e-6)


def check_residuals(ours, vocab: int) -> None:
    """Residual identities, and an all-hooks-cached forward (eager attention) equals the fast one."""
    tokens = padded_batch(vocab, "right")[0][:1]
    with torch.no_grad():
        logits, cache = ours.run_with_cache(tokens)
        torch.testing.assert_close(logits, ours(tokens), rtol=0, atol=1e-4)
    for layer in range(ours.cfg.n_layers):
        c = lambda n, layer=layer: cache[f"blocks.{layer}.hook_{n}"]
        if ours.cfg.parallel_attn_mlp:
            assert f"blocks.{layer}.hook_resid_mid" not in cache
            torch.testing.assert_close(c("resid_post"), c("resid_pre") + c("attn_out") + c("mlp_out"))
        else:
            torch.testing.assert_close(c("resid_mid"), c("resid_pre") + c("attn_out"))
            torch.testing.assert_close(c("resid_post"), c("resid_mid") + c("mlp_out"))
        if layer + 1 < ours.cfg.n_layers:
            assert torch.equal(cache[f"blocks.{layer + 1}.hook_resid_pre"], c("resid_post"))
