"""Logit lens and tuned lens: every row decodes exactly as the model's own tail would, the last row is the
model's output, an untrained tuned lens is the logit lens, training lowers the KL at every layer, and lenses
save, load, refuse other models and resume from checkpoints bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope import CorruptFileError, HookedTransformer, InputError, ModelConfig, StoreMismatchError, zoo
from mechscope.circuits.lens import TunedLens, evaluate_lenses, logit_lens
from mechscope.models.loading import from_pretrained

from conftest import make_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["when mary and john went to the store john gave a drink to", "the big cat sat on the mat", "she ran"]


def small_model(seed: int = 0, n_layers: int = 2, d_model: int = 16) -> HookedTransformer:
    """A tiny LayerNorm model with a 50-token vocabulary and no tokenizer (contexts are given as ids)."""
    cfg = ModelConfig(d_model=d_model, n_layers=n_layers, n_heads=2, d_head=8, d_mlp=32, d_vocab=50, n_ctx=32,
                      normalization="LN", positional="learned", act_fn="gelu", attn_bias=True, mlp_bias=True,
                      model_name=f"small-{seed}")
    return HookedTransformer(cfg).init_weights(seed, std=0.3)


def contexts(n: int = 24, T: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (n, T), generator=torch.Generator().manual_seed(seed))


def _models(tiny_gpt2, tiny_llama):
    processed = from_pretrained(str(tiny_gpt2[1])).process_weights()  # fold_ln, centring: the norm has no weight
    assert processed.ln_final.w is None
    return {"gpt2": tiny_gpt2[2], "llama": tiny_llama[2], "gpt2-processed": processed}


def test_every_row_decodes_like_the_models_own_tail(tiny_gpt2, tiny_llama):
    """Reference: feed each cached residual back with start_at_layer=n_layers, so the model's own ln_final and
    unembedding decode it; the last row must be the model's logits (and its loss)."""
    for name, model in _models(tiny_gpt2, tiny_llama).items():
        tokens, mask = model.to_tokens(TEXTS, return_mask=True)
        res = logit_lens(model, tokens, attention_mask=mask, return_logprobs=True)
        n = model.cfg.n_layers
        assert res.rows == list(range(n + 1)) and res.labels[-1] == "final_post" and res.labels[0] == "0_pre"
        names = [f"blocks.{la}.hook_resid_pre" for la in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
            for row, hook in enumerate(names):
                want = model(cache[hook], start_at_layer=n, attention_mask=mask).float().log_softmax(-1)
                torch.testing.assert_close(res.logprobs[row], want, atol=1e-5, rtol=0, msg=f"{name} row {row}")
            loss = model(tokens, attention_mask=mask, return_type="loss")
        torch.testing.assert_close(res.logprobs[-1], logits.float().log_softmax(-1), atol=1e-5, rtol=0)
        assert float(res.kl_to_final[-1]) < 1e-6 and res.kl_to_final.dtype == torch.float64
        assert float(res.kl_to_final[0]) > 1e-3  # the embeddings predict something else
        assert abs(float(res.cross_entropy[-1]) - float(loss)) < 1e-5
        assert torch.equal(res.valid, mask.bool())
        top = res.top_tokens(3, model=model)
        assert torch.equal(top.ids[-1], logits.topk(3, dim=-1).indices)
        assert top.strings[-1][0][0][0] == model.tokenizer.decode([int(top.ids[-1, 0, 0, 0])])


def test_positions_count_back_from_the_last_real_token(tiny_llama):
    model = tiny_llama[2]
    tokens, mask = model.to_tokens(TEXTS, return_mask=True)  # right padded
    full = logit_lens(model, tokens, attention_mask=mask)
    last = logit_lens(model, tokens, attention_mask=mask, positions=-1, layers=[0, -1])
    ends = mask.sum(-1) - 1
    assert torch.equal(last.positions[:, 0], ends) and last.rows == [0, model.cfg.n_layers]
    rows = torch.arange(len(TEXTS))
    torch.testing.assert_close(last.kl[:, :, 0], full.kl[[0, -1]][:, rows, ends])
    assert torch.equal(last.top_ids[:, :, 0], full.top_ids[[0, -1]][:, rows, ends])
    assert torch.isnan(last.cross_entropy).all()  # no next token after the last one
    with pytest.raises(InputError, match="outside"):
        logit_lens(model, tokens, positions=[40])
    with pytest.raises(InputError, match="layers"):
        logit_lens(model, tokens, layers=[7])
    with pytest.raises(InputError, match="top"):
        full.top_tokens(20)


def test_untrained_tuned_lens_is_the_logit_lens():
    model = make_tiny_lm(0, n_layers=2)
    tokens = model.to_tokens(["The state of the Union is strong.", "We hold these truths"], prepend_bos=True)
    plain = logit_lens(model, tokens)
    lens = TunedLens(model)
    assert lens.weight.shape == (2, 32, 32) and not lens.weight.any() and not lens.bias.any()
    tuned = lens(tokens)
    assert tuned.lens == "tuned" and torch.equal(tuned.kl, plain.kl) and torch.equal(tuned.top_ids, plain.top_ids)
    assert list(lens.parameters()) == [lens.weight, lens.bias]  # the model's weights are not the lens's
    assert lens.eval() is lens and not lens.training  # nn.Module's train/eval switch still works
    with pytest.raises(InputError, match="TunedLens.train"):
        lens.train(model)


@pytest.mark.slow  # the session's induction-2l fixture trains for ~1-2 min
def test_training_lowers_kl_at_every_layer(induction_2l_folder, tmp_path):
    """~50 steps on State of the Union text (the zoo model's own tokenizer), evaluated on the held-out split."""
    model = zoo.load(induction_2l_folder)
    lens = TunedLens.train(model, "sotu", steps=50, batch_size=8, context_len=64, seed=0, progress=False)
    table = evaluate_lenses(model, "sotu", 4096, tuned=lens, context_len=64, progress=False)
    n = model.cfg.n_layers
    assert table.labels == ["0_pre", "1_pre", "final_post"] and table.n_tokens > 3000
    assert (table.kl_tuned[:n] < 0.8 * table.kl_logit[:n]).all(), table.to_markdown()
    assert float(table.kl_logit[-1]) < 1e-6 and float(table.kl_tuned[-1]) < 1e-6
    assert abs(table.model_ce - float(table.ce_tuned[-1])) < 1e-9
    assert "| 0_pre |" in table.to_markdown()
    assert len(lens.train_log["loss"]) == 50 and lens.train_log["loss"][-1] < lens.train_log["loss"][0]
    # saved and loaded back: bit-identical translators, the same readings
    lens.save(tmp_path / "lens")
    again = TunedLens.load(tmp_path / "lens", model)
    assert torch.equal(again.weight, lens.weight) and torch.equal(again.bias, lens.bias)
    assert again.train_config == lens.train_config
    tokens = model.to_tokens("The Congress shall have power")
    assert torch.equal(again(tokens).kl, lens(tokens).kl)


def test_deterministic_and_resumes_exactly(tmp_path):
    model, data = small_model(0), contexts()
    kw = dict(steps=6, batch_size=5, seed=3, progress=False)  # 30 contexts from 24: crosses an epoch boundary
    a = TunedLens.train(model, data, **kw)
    b = TunedLens.train(model, data, **kw)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.weight.any()
    other = TunedLens.train(model, data, **{**kw, "seed": 4})
    assert not torch.equal(other.weight, a.weight)
    # interrupted after 3 steps (last checkpoint at step 2 ... and the stop), then resumed
    ckpt = tmp_path / "ckpt"
    TunedLens.train(model, data, checkpoint_dir=ckpt, checkpoint_every=2, stop_after=3, **kw)
    state = json.loads((ckpt / ".checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    resumed = TunedLens.train(model, data, checkpoint_dir=ckpt, checkpoint_every=2, **kw)
    assert torch.equal(resumed.weight, a.weight) and torch.equal(resumed.bias, a.bias)
    assert resumed.train_log["loss"] == a.train_log["loss"]
    # a finished run's folder returns the same lens at once; other settings are refused
    assert torch.equal(TunedLens.train(model, data, checkpoint_dir=ckpt, **kw).weight, a.weight)
    with pytest.raises(InputError, match="other settings"):
        TunedLens.train(model, data, checkpoint_dir=ckpt, **{**kw, "steps": 7})
    adam = TunedLens.train(model, data, optimizer="adam", **kw)
    assert adam.train_config.optimizer == "adam" and adam.train_config.lr == 1e-3 and adam.train_config.warmup == 1


def test_lens_for_another_model_is_refused(tmp_path):
    model = small_model(0)
    lens = TunedLens.train(model, contexts(), steps=2, batch_size=4, progress=False)
    lens.save(tmp_path / "lens")
    again = TunedLens.load(tmp_path / "lens", model)  # round trip: bit-identical
    assert torch.equal(again.weight, lens.weight) and torch.equal(again.bias, lens.bias) and lens.weight.any()
    assert again.train_config == lens.train_config and again.train_log == lens.train_log
    assert torch.equal(again(contexts(2)).kl, lens(contexts(2)).kl)
    for other, why in ((small_model(1), "weights_fingerprint"), (small_model(0, n_layers=3), "3 layers"),
                       (small_model(0, d_model=24), "d_model")):
        with pytest.raises(StoreMismatchError, match=why):
            TunedLens.load(tmp_path / "lens", other)
    processed = small_model(0).process_weights()
    with pytest.raises(StoreMismatchError, match="trained on"):
        TunedLens.load(tmp_path / "lens", processed)
    with pytest.raises(StoreMismatchError):
        evaluate_lenses(small_model(1), contexts(), 64, tuned=lens, progress=False)
    (tmp_path / "lens" / "lens.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptFileError):
        TunedLens.load(tmp_path / "lens", model)
    with pytest.raises(CorruptFileError):
        TunedLens.load(tmp_path / "nothing", model)


def test_bad_training_settings():
    model = small_model(0)
    with pytest.raises(InputError, match="optimizer"):
        TunedLens.train(model, contexts(), optimizer="lbfgs", progress=False)
    with pytest.raises(InputError, match="steps"):
        TunedLens.train(model, contexts(), steps=0, progress=False)
    with pytest.raises(InputError, match="contexts"):
        TunedLens.train(model, torch.zeros(4), steps=1, progress=False)
