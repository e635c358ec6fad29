"""Probes on tiny models: positions, fit / score / save / load, typed errors, ActivationStore, sweep, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope import probes
from mechscope.cli import main
from mechscope.errors import ArtifactMismatchError, HookNameError, InputError, NonFiniteError

pytestmark = pytest.mark.usefixtures("one_thread")

NOUNS = {1: "dog", 0: "cat"}
FILLERS = ["the big", "a small red", "the blue", "a", "the red big", "when mary saw the", "john gave a"]


def animal_texts(n=56, seed=0, fillers=FILLERS):
    """'<filler> dog' (label 1) or '<filler> cat' (label 0), each filler with both nouns: the concept sits at
    the last token and only there."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    labels = [i % 2 for i in order]
    return [f"{fillers[(i // 2) % len(fillers)]} {NOUNS[i % 2]}" for i in order], labels


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2):
    return tiny_gpt2[2]


def test_positions_read_the_right_tokens_under_padding(gpt2):
    texts = ["the big dog", "a cat", "when mary saw the red dog"]
    hook = "blocks.1.hook_resid_post"
    last = probes.collect(gpt2, texts, [hook], "last").rows[hook]
    mean = probes.collect(gpt2, texts, [hook], "mean").rows[hook]
    every = probes.collect(gpt2, texts, [hook], "all")
    for i, t in enumerate(texts):  # one text alone (no padding) = its row in the padded batch
        _, cache = gpt2.run_with_cache(t, names_filter=hook)
        a = cache[hook][0]  # [T, D], position 0 = BOS
        assert torch.allclose(last[i], a[-1], atol=1e-5)
        assert torch.allclose(mean[i], a[1:].mean(0), atol=1e-5)  # BOS excluded
        assert torch.allclose(every.rows[hook][every.text_of == i], a[1:], atol=1e-5)


def test_fit_score_save_load_round_trip(gpt2, tiny_llama, tmp_path):
    texts, labels = animal_texts()
    test_texts, test_labels = animal_texts(20, seed=1)
    p = probes.fit(gpt2, texts, labels, hook="blocks.1.hook_resid_post", position="last", method="logistic")
    assert p.cv_auroc > 0.9 and p.C in probes.C_GRID
    s = p.score(gpt2, test_texts)
    assert s.shape == (20,) and s.dtype == torch.float32
    assert probes.auroc(s, test_labels) > 0.9
    assert (p.predict(gpt2, test_texts) == torch.tensor(test_labels)).float().mean() > 0.8
    p.save(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert meta["hook"] == "blocks.1.hook_resid_post" and meta["position"] == "last"
    assert meta["model"]["weights_fingerprint"] and "normalisation" in meta
    q = probes.load(tmp_path / "p", model=gpt2)
    assert torch.equal(q.score(gpt2, test_texts), s)
    with pytest.raises(ArtifactMismatchError, match="another model|not on the model"):
        probes.load(tmp_path / "p", model=tiny_llama[2])
    with pytest.raises(ArtifactMismatchError, match="blocks.1.hook_resid_post"):
        probes.load(tmp_path / "p", model=gpt2, hook="blocks.0.hook_resid_post")
    with pytest.raises(ArtifactMismatchError):
        q.score(tiny_llama[2], test_texts)


@pytest.mark.parametrize("position", ["mean", "all"])
@pytest.mark.parametrize("method", ["logistic", "diffmeans"])
def test_positions_and_methods_learn_the_planted_word(gpt2, position, method):
    short = ["the", "a", "big", "small", "red", "blue", "it"]  # one filler word: the noun is half the text
    texts, labels = animal_texts(fillers=short)
    test_texts, test_labels = animal_texts(20, seed=1, fillers=short)
    p = probes.fit(gpt2, texts, labels, hook="blocks.0.hook_resid_post", position=position, method=method)
    assert p.cv_auroc > 0.9
    assert probes.auroc(p.score(gpt2, test_texts), test_labels) > 0.9


def test_bad_input_is_a_typed_error_with_the_fix(gpt2):
    texts, labels = animal_texts(10)
    hook = "blocks.1.hook_resid_post"
    with pytest.raises(InputError, match="both labels"):
        probes.fit(gpt2, texts, [1] * 10, hook=hook)
    with pytest.raises(InputError, match="9 labels for 10 texts"):
        probes.fit(gpt2, texts, labels[:9], hook=hook)
    with pytest.raises(InputError, match="0 or 1"):
        probes.fit(gpt2, texts, [2] * 10, hook=hook)
    with pytest.raises(HookNameError, match="Did you mean"):
        probes.fit(gpt2, texts, labels, hook="blocks.1.hook_resid_pots")
    with pytest.raises(InputError, match="method"):
        probes.fit(gpt2, texts, labels, hook=hook, method="svm")
    with pytest.raises(InputError, match="position"):
        probes.fit(gpt2, texts, labels, hook=hook, position="first")

    def nan_hook(x, hook):
        return x * float("nan")

    with gpt2.hooks([("blocks.0.hook_mlp_out", nan_hook)]), pytest.raises(NonFiniteError, match="NaN"):
        probes.fit(gpt2, texts, labels, hook=hook)


def test_sweep_reads_every_layer_in_one_forward_per_batch(gpt2):
    texts, labels = animal_texts()
    test_texts, test_labels = animal_texts(20, seed=1)
    calls = []
    with gpt2.hooks([("hook_embed", lambda x, hook: calls.append(1))]):
        sw = probes.sweep(gpt2, texts, labels, position="last", method="logistic", batch_size=16,
                          test_texts=test_texts, test_labels=test_labels)
    assert len(calls) == 4 + 2  # ceil(56 / 16) + ceil(20 / 16) forwards for all layers together
    assert sw.auroc.shape == (gpt2.cfg.n_layers,) and sw.hooks[1] == "blocks.1.hook_resid_post"
    assert float(sw.auroc.min()) > 0.9 and float(sw.test_auroc.min()) > 0.9
    assert sw.best_layer in sw.layers and sw.probe(sw.best_layer).hook == sw.hooks[sw.best_index]
    plot = sw.plot()
    assert plot.png.startswith(b"\x89PNG") and plot.data["kind"] == "probe_sweep"
    assert "cv_auroc" in sw.table()
    g = torch.Generator().manual_seed(3)
    shuffled = torch.randint(0, 2, (len(texts),), generator=g)  # labels unrelated to the texts
    assert abs(float(probes.sweep(gpt2, texts, shuffled, method="diffmeans").auroc.mean()) - 0.5) < 0.2


def test_fit_on_an_activation_store(tiny_lm_folder, tmp_path):
    from mechscope import ActivationStore

    _, model = tiny_lm_folder
    hook = "blocks.2.hook_resid_post"
    store = ActivationStore.harvest(model, hook, 1200, tmp_path / "store", context_len=32, batch_size=4,
                                    progress=False)
    ids = torch.cat([b["tokens"] for b in store.batches(4096, hooks=[hook], shuffle=False, with_tokens=True)])
    label_of = lambda t: (t % 2 == 0).long()  # noqa: E731  (token parity: a property of the current token)
    p = probes.fit(store, label_of, hook=hook, method="diffmeans", folds=3)
    assert p.position == "all" and p.n_train == store.n_tokens
    assert p.model == store.manifest["model"]
    p.check_model(model)  # the store's model is this one
    q = probes.fit(store, label_of(ids), hook=hook, method="diffmeans", folds=3)
    assert torch.equal(q.fit.weight, p.fit.weight)
    with pytest.raises(InputError, match="labels for"):
        probes.fit(store, label_of(ids)[:10], hook=hook)


def test_builtin_datasets_are_deterministic_balanced_and_split_by_item():
    for name in probes.datasets.names():
        train, test = probes.datasets.load(name), probes.datasets.load(name, "test")
        assert train == probes.datasets.load(name) and len(test) >= 18
        for ds in (train, test):
            assert 0 < sum(ds.labels) < len(ds) and len(ds.groups) == len(ds)
        assert not set(train.groups) & set(test.groups)  # a held-out item never appears in training
        assert len(train) + len(test) == len(probes.datasets.load(name, "all"))
    with pytest.raises(InputError, match="cities"):
        probes.datasets.load("no-such-dataset")


def test_probe_command_sweeps_saves_and_caches(tiny_lm_folder, tmp_path, capsys):
    folder, model = tiny_lm_folder
    out = tmp_path / "run"
    argv = ["probe", "--model", str(folder), "--dataset", "sentiment", "--out", str(out), "--method", "diffmeans",
            "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "best layer" in text and "held-out" in text
    assert (out / "sweep.png").exists() and json.loads((out / "sweep.json").read_text())["kind"] == "probe_sweep"
    assert probes.load(out / "probe", model=model).method == "diffmeans"
    assert main(argv) == 0
    assert "cached" in capsys.readouterr().out
    assert main(["probe", "--model", str(folder), "--out", str(out)]) == 2  # neither --dataset nor --data
    assert "--dataset" in capsys.readouterr().err


def test_logistic_probe_auroc_matches_sklearn_on_model_activations(tiny_lm_folder):
    """The acceptance check: same activations (a built-in dataset through a model), same C, same
    standardisation -> held-out AUROC within 1e-3 of scikit-learn's LogisticRegression."""
    sk = pytest.importorskip("sklearn.linear_model")
    from sklearn.metrics import roc_auc_score

    _, model = tiny_lm_folder
    hook = "blocks.2.hook_resid_post"
    train, test = probes.datasets.load("truefalse"), probes.datasets.load("truefalse", "test")
    for position in ("last", "mean"):
        p = probes.fit(model, train.texts, train.labels, hook=hook, position=position, C=1.0, cross_validated=False)
        Xtr = probes.collect(model, train.texts, [hook], position).rows[hook].double()
        Xte = probes.collect(model, test.texts, [hook], position).rows[hook].double()
        ref = sk.LogisticRegression(C=1.0, max_iter=10_000, tol=1e-10).fit(
            ((Xtr - p.fit.mean) / p.fit.std).numpy(), train.labels)
        theirs = roc_auc_score(test.labels, ref.decision_function(((Xte - p.fit.mean) / p.fit.std).numpy()))
        ours = probes.auroc(p.score(model, test.texts), test.labels)
        assert abs(ours - theirs) < 1e-3, (position, ours, theirs)


@pytest.mark.slow
def test_smollm2_cities_probe_reads_truth_in_middle_layers():
    """Real weights: a layer-12 residual probe separates true from false city statements on held-out cities
    (measured 0.91; chance 0.5), and a layer-0 probe does not."""
    from mechscope import HookedTransformer

    m = HookedTransformer.from_pretrained("smollm2")
    train, test = probes.datasets.load("cities"), probes.datasets.load("cities", "test")
    aucs = {}
    for layer in (0, 12):
        p = probes.fit(m, train.texts, train.labels, hook=f"blocks.{layer}.hook_resid_post", position="last",
                       groups=train.groups, C=0.01, cross_validated=False)
        aucs[layer] = probes.auroc(p.score(m, test.texts), test.labels)
    assert aucs[12] > 0.8 and aucs[0] < 0.7, aucs


def test_probe_command_defaults_match_the_api():
    """`mechscope probe` forwards to probes.sweep / probes.fit: its hand-written defaults must be the API's."""
    import inspect

    from mechscope.cli import _parser

    sub = next(a for a in _parser()._actions if a.dest == "command").choices["probe"]
    args = sub.parse_args(["--dataset", "cities", "--out", "x"])
    for fn in (probes.sweep, probes.fit):
        sig = inspect.signature(fn).parameters
        for dest in ("position", "method", "C", "folds", "seed", "batch_size"):
            assert getattr(args, dest) == sig[dest].default, (fn.__name__, dest)
