"""ROME and MEMIT on tiny random Llama and GPT-2 models: the rank-one algebra, efficacy, exact undo, save and
reload, typed errors, the CLI; one slow test on SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mechscope import HookedTransformer, edit
from mechscope.cli import main
from mechscope.edit.evaluate import sequence_logprob
from mechscope.errors import InputError, NonFiniteError

# random tiny models: the subject ends the prompt, so the edited MLP reaches the prediction without relying on
# the (random) attention moving it there
PROMPT, SUBJECT = "the big cat sat on the mat and the small dog", "the small dog"
FAST = {"n_prefixes": 2, "prefix_len": 4, "cov_tokens": 3000, "steps": 25}


@pytest.fixture(params=["llama", "gpt2"])
def model(request, tiny_llama, tiny_gpt2, tmp_path_factory, monkeypatch, one_thread):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    m = (tiny_llama if request.param == "llama" else tiny_gpt2)[2]
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    yield m
    for k, v in m.state_dict().items():  # the fixture is shared: every test must leave it as it found it
        assert torch.equal(v, before[k]), k


CANDIDATES = ("cat", "house", "blue", "red", "store", "drink", "big", "went")


def _new_for(m, logits: torch.Tensor) -> str:
    """A word the model finds unlikely after the prompt (the middle of the candidates by logit)."""
    ranked = sorted(CANDIDATES, key=lambda w: float(logits[m.to_single_token(w)]))
    return " " + ranked[len(ranked) // 2]


def _old_and_new(m) -> tuple[str, str]:
    with torch.no_grad():
        logits = m(PROMPT)[0, -1]
    return m.to_string([int(logits.argmax())]), _new_for(m, logits)


def _lp(m, text: str) -> float:
    return float(sequence_logprob(m, [PROMPT], text)[0])


def test_rank_one_update_writes_v_star_and_spares_orthogonal_keys(model):
    old, new = _old_and_new(model)
    layer = 0  # (in a 2-layer model the last layer's MLP at the subject cannot reach the last position)
    W0 = model.blocks[layer].mlp.down.weight.detach().clone()
    e = edit.rome(model, PROMPT, SUBJECT, new, layer=layer, **FAST)
    try:
        lin = model.blocks[layer].mlp.down
        k, v = e.keys[layer][0], e.values[layer][0]
        got = F.linear(k.to(lin.weight.dtype), lin.weight, lin.bias)
        assert torch.allclose(got, v, atol=1e-4 * max(1.0, float(v.abs().max()))), (got - v).abs().max()
        C = edit.key_covariance(model, layer, tokens=FAST["cov_tokens"])[layer].double()
        u = torch.linalg.solve(C, k.double())
        g = torch.Generator().manual_seed(0)
        others = torch.randn(5, k.shape[0], generator=g, dtype=torch.float64) * k.double().norm() / k.shape[0] ** 0.5
        perp = others - (others @ u)[:, None] / float(k.double() @ u) * k.double()[None]  # k^T C^-1 k* = 0
        assert (perp @ u).abs().max() < 1e-6 * float(perp.norm())
        before, after = perp @ W0.double().T, perp @ lin.weight.detach().double().T
        assert (after - before).abs().max() < 1e-4 * before.abs().max()
        # only the edited matrix changed, by a rank-one update
        assert torch.linalg.matrix_rank(e.deltas[layer].double(), rtol=1e-6) == 1
    finally:
        e.undo()


def test_rome_efficacy_undo_bit_exact_and_reload(model, tmp_path):
    from mechscope.models.loading import from_pretrained

    old, new = _old_and_new(model)
    assert _lp(model, new) < _lp(model, old) - 1.0
    params0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    e = edit.rome(model, PROMPT, SUBJECT, new, layer=0, **FAST)
    try:
        assert _lp(model, new) > _lp(model, old) + 1.0, (e.info, _lp(model, new), _lp(model, old))
        assert e.layers == [0] and e.method == "rome" and "rome" in repr(e)
        model.save_pretrained(tmp_path / "edited")
        with torch.no_grad():
            want = model(PROMPT)
        back = from_pretrained(str(tmp_path / "edited"))
        with torch.no_grad():
            assert torch.allclose(back(PROMPT), want, atol=1e-5)
        assert torch.equal(back.blocks[0].mlp.down.weight, model.blocks[0].mlp.down.weight)
    finally:
        e.undo()
    for k, v in model.named_parameters():
        assert torch.equal(v, params0[k]), k
    e.undo()  # twice is harmless


def test_multi_token_target_is_optimised_as_a_sequence(tiny_llama, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path))
    m = tiny_llama[2]
    target = " cat ran"
    before = _lp(m, target)
    e = edit.rome(m, PROMPT, SUBJECT, target, layer=0, **FAST)
    try:
        assert _lp(m, target) > before + 2.0
    finally:
        e.undo()


def test_memit_edits_several_facts_and_undoes(model):
    reqs = []
    for prompt, subject in [(PROMPT, SUBJECT), ("when she went to the store she gave it to mary", "mary"),
                            ("the dog ran to the house of john", "john")]:
        with torch.no_grad():
            logits = model(prompt)[0, -1]
        new = _new_for(model, logits)
        old = max(CANDIDATES, key=lambda w: float(logits[model.to_single_token(w)]))
        reqs.append({"prompt": prompt, "subject": subject, "target": new, "old": " " + old})
    gaps0 = [float(sequence_logprob(model, [r["prompt"]], r["target"])[0]
                   - sequence_logprob(model, [r["prompt"]], r["old"])[0]) for r in reqs]
    e = edit.memit(model, reqs, layers=[0], n_prefixes=2, prefix_len=4, cov_tokens=3000, steps=25,
                   clamp_norm=4.0, mom2_weight=100.0)
    try:
        gaps = [float(sequence_logprob(model, [r["prompt"]], r["target"])[0]
                      - sequence_logprob(model, [r["prompt"]], r["old"])[0]) for r in reqs]
        assert all(g > g0 + 1.0 for g, g0 in zip(gaps, gaps0, strict=True)), (gaps0, gaps)
        assert sorted(e.deltas) == [0]
        s = edit.evaluate_edits(model, reqs)
        assert s["n"] == 3 and 0 <= s["efficacy"] <= 1 and s["generalisation"] is None
    finally:
        e.undo()


def test_typed_errors(model):
    _, new = _old_and_new(model)
    with pytest.raises(InputError, match=r"not found in the prompt .*tokens"):
        edit.rome(model, PROMPT, "the red cat", new, **FAST)
    with pytest.raises(InputError, match="Unknown layer 7"):
        edit.rome(model, PROMPT, SUBJECT, new, layer=7, **FAST)
    with pytest.raises(InputError, match="non-empty"):
        edit.rome(model, PROMPT, SUBJECT, "", **FAST)
    with pytest.raises(InputError, match="non-empty list"):
        edit.memit(model, [])
    with pytest.raises(InputError, match="prompt, subject and target"):
        edit.memit(model, [{"prompt": PROMPT, "subject": SUBJECT}])
    with pytest.raises(InputError, match="lr"):
        edit.rome(model, PROMPT, SUBJECT, new, **{**FAST, "lr": float("nan")})
    # NaN while optimising the value (as an fp16 overflow would make): a typed error and the model untouched
    # (the fixture checks every weight)
    nan = [("blocks.1.hook_resid_post", lambda x, hook: x * float("nan"))]
    no_prefix = {**FAST, "n_prefixes": 0}  # (sampling prefixes from a NaN model would fail first)
    with model.hooks(fwd_hooks=nan), pytest.raises(NonFiniteError, match="not changed"):
        edit.rome(model, PROMPT, SUBJECT, new, layer=0, **no_prefix)
    with model.hooks(fwd_hooks=nan), pytest.raises(NonFiniteError, match="not changed"):
        edit.memit(model, [{"prompt": PROMPT, "subject": SUBJECT, "target": new}], layers=[0], **no_prefix)


def test_ngram_entropy():
    assert edit.ngram_entropy("a a a a a a") == 0.0
    assert edit.ngram_entropy("the cat sat on the mat and ran") > edit.ngram_entropy("the cat the cat the cat")


def test_cli_edit_saves_a_model_that_reloads_edited(tiny_gpt2, tmp_path, monkeypatch, capsys, one_thread):
    from mechscope.models.loading import from_pretrained

    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    _, folder, m = tiny_gpt2
    _, new = _old_and_new(m)
    out = tmp_path / "edited"
    argv = ["edit", "--model", str(folder), "--prompt", PROMPT, "--subject", SUBJECT, "--target", new,
            "--layer", "0", "--cov-tokens", "3000", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "rome on layer(s) [0]" in text and "->" in text
    edited = from_pretrained(str(out))
    assert _lp(edited, new) > _lp(m, new) + 1.0
    assert json.loads((out / "config.json").read_text())["mechscope_extra"]["edit"]["method"] == "rome"
    assert main(argv) == 0 and "cached" in capsys.readouterr().out
    assert main(["edit", "--model", str(folder), "--prompt", PROMPT, "--out", str(tmp_path / "x")]) == 2
    assert "--subject" in capsys.readouterr().err


@pytest.mark.slow
def test_rome_on_smollm2_eiffel_tower_and_builtin_facts_are_known():
    m = HookedTransformer.from_pretrained("smollm2")
    reqs = edit.requests.load()
    assert len(reqs) >= 25 and all(len(r.paraphrases) == 2 and len(r.neighbours) == 2 for r in reqs)
    for r in reqs:
        assert len(m.to_tokens(r.target, prepend_bos=False)[0]) == 1 == len(m.to_tokens(r.old, prepend_bos=False)[0])
    with torch.no_grad():
        lp = m([r.prompt for r in reqs], padding_side="left")[:, -1].float().log_softmax(-1)
    for i, r in enumerate(reqs):
        old, new = m.to_single_token(r.old), m.to_single_token(r.target)
        assert old in lp[i].topk(5).indices.tolist() and lp[i, old] > lp[i, new] + 1.0, r.prompt
    p0 = {k: v.detach().clone() for k, v in m.named_parameters()}
    prompt = "The Eiffel Tower is located in the city of"
    e = edit.rome(m, prompt=prompt, subject="The Eiffel Tower", target=" Rome", cov_tokens=5000)
    rome_lp, paris_lp = (float(sequence_logprob(m, [prompt], t)[0]) for t in (" Rome", " Paris"))
    assert rome_lp > paris_lp + 2.0
    e.undo()
    assert all(torch.equal(v, p0[k]) for k, v in m.named_parameters())


def test_key_covariance_is_cached_per_layer(tiny_llama, tmp_path, one_thread):
    m = tiny_llama[2]
    a = edit.key_covariance(m, [0, 1], tokens=1000, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("cov-*.safetensors"))
    assert len(files) == 2 and a[0].shape == (m.cfg.d_mlp, m.cfg.d_mlp)
    assert torch.allclose(a[0], a[0].T) and float(torch.linalg.eigvalsh(a[0].double()).min()) > -1e-6
    b = edit.key_covariance(m, 1, tokens=1000, cache_dir=tmp_path)
    assert torch.equal(b[1], a[1]) and sorted(tmp_path.glob("cov-*.safetensors")) == files
    assert edit.key_covariance(m, 1, tokens=2000, cache_dir=tmp_path)[1].shape == a[1].shape  # another key
    assert len(list(tmp_path.glob("cov-*.safetensors"))) == 3
    with pytest.raises(InputError, match="Unknown layer -1"):
        edit.key_covariance(m, -1, cache_dir=tmp_path)


def test_cli_edit_nan_during_optimisation_saves_nothing(tiny_gpt2, tmp_path, monkeypatch, capsys, one_thread):
    """NaN while optimising (as an fp16 overflow would make): `mechscope edit` exits with the typed error and
    writes no model and no done-marker, so a rerun does not pick up a broken edit."""
    import mechscope.models.loading as loading

    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    _, folder, m = tiny_gpt2
    _, new = _old_and_new(m)
    real_load = loading.load_model

    def nan_model(*a, **k):
        model = real_load(*a, **k)
        model.add_hook("blocks.1.hook_resid_post", lambda x, hook: x * float("nan"))
        return model

    monkeypatch.setattr(loading, "load_model", nan_model)
    out = tmp_path / "edited"
    argv = ["edit", "--model", str(folder), "--prompt", PROMPT, "--subject", SUBJECT, "--target", new,
            "--layer", "0", "--cov-tokens", "3000", "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "NonFiniteError" in err or "not changed" in err or "NaN" in err, err
    assert not (out / "model.safetensors").exists() and not any(out.glob("*.json"))
