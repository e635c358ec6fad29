"""circuit-tracer's transcoder layouts: files built by hand from the documented layout read identically, our writer
round-trips, unsupported exports fail typed, and (when benchmarks/.venv-circuit-tracer exists) circuit-tracer's
own classes agree with us in both directions."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mechscope import sae
from mechscope.errors import CorruptFileError, UnknownFormatError, UnsupportedArchitectureError

L, D, N = 3, 16, 24
PEER = Path(__file__).parents[2] / "benchmarks" / ".venv-circuit-tracer" / "bin" / "python"
if not PEER.exists():  # the shared peer venv of the main checkout (worktrees have none of their own)
    PEER = Path("/work/main/benchmarks/.venv-circuit-tracer/bin/python")
PEER_SCRIPT = Path(__file__).parents[2] / "benchmarks" / "_peer_circuit_tracer.py"


def gen(seed):
    return torch.Generator().manual_seed(seed)


def write_plt_by_hand(folder: Path, jump: bool) -> dict[int, dict[str, torch.Tensor]]:
    """config.yaml + layer_{i}.safetensors exactly as the module docstring documents (not through our writer)."""
    folder.mkdir(parents=True)
    layers = {}
    for i in range(L):
        t = {"W_enc": torch.randn(N, D, generator=gen(i)), "W_dec": torch.randn(N, D, generator=gen(10 + i)),
             "b_enc": torch.randn(N, generator=gen(20 + i)) * 0.3, "b_dec": torch.randn(D, generator=gen(30 + i)),
             "W_skip": torch.randn(D, D, generator=gen(40 + i)) * 0.1}
        if jump:
            t["activation_function.threshold"] = torch.rand(N, generator=gen(50 + i))
        save_file(t, str(folder / f"layer_{i}.safetensors"))
        layers[i] = t
    (folder / "config.yaml").write_text("model_kind: transcoder_set\nmodel_name: tiny\n"
                                        "feature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n")
    return layers


@pytest.mark.parametrize("jump", [False, True])
def test_hand_written_plt_files_read_as_documented(tmp_path, jump):
    layers = write_plt_by_hand(tmp_path / "plt", jump)
    ts = sae.load_transcoders(tmp_path / "plt")
    assert ts.input_hooks == [f"blocks.{i}.hook_resid_mid" for i in range(L)]
    assert ts.output_hooks == [f"blocks.{i}.hook_mlp_out" for i in range(L)]
    assert ts.model_name == "tiny" and ts.has_skip and not ts.cross_layer
    x = torch.randn(9, D, generator=gen(99))
    for i, t in layers.items():
        pre = F.linear(x, t["W_enc"], t["b_enc"])  # circuit-tracer's encoder rule
        acts = pre * (pre > t["activation_function.threshold"]) if jump else F.relu(pre)
        torch.testing.assert_close(ts.encode(i, x), acts, atol=1e-5, rtol=1e-5)
        want = acts @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T
        torch.testing.assert_close(ts.reconstruct([x] * L)[i], want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ts.encoder(i), t["W_enc"].T)


def test_hand_written_clt_files_read_as_documented(tmp_path):
    folder = tmp_path / "clt"
    folder.mkdir()
    enc, dec = {}, {}
    for i in range(L):
        enc[i] = {f"W_enc_{i}": torch.randn(N, D, generator=gen(i)), f"b_enc_{i}": torch.randn(N, generator=gen(5 + i)),
                  f"b_dec_{i}": torch.randn(D, generator=gen(9 + i)), f"threshold_{i}": torch.rand(N, generator=gen(i))}
        dec[i] = torch.randn(N, L - i, D, generator=gen(20 + i))
        save_file(enc[i], str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": dec[i]}, str(folder / f"W_dec_{i}.safetensors"))
    ts = sae.load_transcoders(folder, input_hook="blocks.{l}.ln2.hook_normalized")
    assert ts.cross_layer and ts.n_layers == L and ts.n_features == [N] * L
    assert ts.input_hooks[2] == "blocks.2.ln2.hook_normalized" and ts.output_hooks[2] == "blocks.2.hook_mlp_out"
    xs = [torch.randn(4, D, generator=gen(60 + i)) for i in range(L)]
    acts = []
    for i in range(L):
        pre = F.linear(xs[i], enc[i][f"W_enc_{i}"], enc[i][f"b_enc_{i}"])
        acts.append(pre * (pre > enc[i][f"threshold_{i}"]))
        torch.testing.assert_close(ts.encode(i, xs[i]), acts[i])
    for dst in range(L):
        want = enc[dst][f"b_dec_{dst}"] + sum(acts[s] @ dec[s][:, dst - s] for s in range(dst + 1))
        torch.testing.assert_close(ts.reconstruct(xs)[dst], want, atol=1e-4, rtol=1e-4)
        for src in range(L):
            w = ts.decoder(src, dst)
            assert (w is None) == (dst < src)
            if w is not None:
                torch.testing.assert_close(w, dec[src][:, dst - src])


def _plt(arch: str, skip: bool = True):
    coders = []
    for i in range(L):
        cfg = sae.SAEConfig(arch=arch, d_in=D, n_latents=N, d_out=D, k=4 if arch == "topk" else None, skip=skip,
                            hook_in=f"blocks.{i}.ln2.hook_normalized", hook_out=f"blocks.{i}.hook_mlp_out",
                            input_scale=1.5, output_scale=0.7)
        c = sae.SparseCoder(cfg).init_weights(i)
        with torch.no_grad():
            c.b_enc.normal_(0, 0.2, generator=gen(i))
            if skip:
                c.W_skip.normal_(0, 0.1, generator=gen(i))
        coders.append(c)
    return sae.TranscoderSet.from_coders(coders)


def _clt(arch: str):
    cfg = sae.CLTConfig(n_layers=L, d_in=D, n_features=N, arch=arch, k=4 if arch == "topk" else None,
                        input_hooks=[f"blocks.{i}.ln2.hook_normalized" for i in range(L)],
                        output_hooks=[f"blocks.{i}.hook_mlp_out" for i in range(L)],
                        input_scales=[1.0, 2.0, 0.5], output_scales=[0.5, 1.0, 3.0])
    clt = sae.CrossLayerTranscoder(cfg).init_weights(3)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.2, generator=gen(1))
        clt.b_dec.normal_(0, 0.2, generator=gen(2))
    return sae.TranscoderSet.from_clt(clt)


@pytest.mark.parametrize("make", [lambda: _plt("jumprelu"), lambda: _plt("relu", skip=False),
                                  lambda: _clt("jumprelu"), lambda: _clt("relu")])
def test_writer_round_trips(tmp_path, make):
    ts = make()
    ts.save(tmp_path / "ct", format="circuit-tracer")
    names = sorted(p.name for p in (tmp_path / "ct").iterdir())
    assert "config.yaml" in names
    assert ("W_dec_2.safetensors" in names) == ts.cross_layer and ("layer_2.safetensors" in names) != ts.cross_layer
    assert sae.detect_format is not None
    back = sae.load_transcoders(tmp_path / "ct")
    assert back.input_hooks == ts.input_hooks and back.output_hooks == ts.output_hooks  # mlp.hook_in <-> ln2
    xs = [torch.randn(6, D, generator=gen(70 + i)) for i in range(L)]
    for a, b in zip(ts.reconstruct(xs), back.reconstruct(xs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for i in range(L):
        torch.testing.assert_close(ts.encode(i, xs[i]), back.encode(i, xs[i]), atol=1e-5, rtol=1e-4)


def test_unsupported_and_broken_folders(tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="jumprelu"):
        _plt("topk").save(tmp_path / "a", format="circuit-tracer")
    with pytest.raises(UnsupportedArchitectureError, match="topk"):
        _clt("topk").save(tmp_path / "b", format="circuit-tracer")
    write_plt_by_hand(tmp_path / "gap", jump=False)
    (tmp_path / "gap" / "layer_1.safetensors").unlink()
    with pytest.raises(CorruptFileError, match="layer_1"):
        sae.load_transcoders(tmp_path / "gap")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.yaml").write_text("model_kind: transcoder_set\ntranscoders:\n  - hf://a/b/layer_0.safetensors\n")
    with pytest.raises(UnknownFormatError, match="download"):
        sae.load_transcoders(tmp_path / "hub")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownFormatError, match="config.yaml"):
        sae.load_transcoders(tmp_path / "empty")
    write_plt_by_hand(tmp_path / "set", jump=True)
    with pytest.raises(UnknownFormatError, match="load_transcoders"):  # one coder's loader points at the set loader
        sae.load(tmp_path / "set")


@pytest.mark.slow
@pytest.mark.skipif(not PEER.exists(), reason="benchmarks/.venv-circuit-tracer (circuit-tracer 0.5) not built")
def test_circuit_tracer_itself_agrees(tmp_path):
    """circuit-tracer writes -> we read; we write -> circuit-tracer reads: same activations and outputs."""
    subprocess.run([str(PEER), str(PEER_SCRIPT), "write", str(tmp_path)], check=True, timeout=600)
    ref = load_file(str(tmp_path / "peer_outputs.safetensors"))
    x = list(ref["x"])  # L x [5, D]
    plt, clt = sae.load_transcoders(tmp_path / "plt"), sae.load_transcoders(tmp_path / "clt")
    assert plt.input_hooks[0] == "blocks.0.ln2.hook_normalized" and plt.output_hooks[0] == "blocks.0.hook_mlp_out"
    for i in range(L):
        torch.testing.assert_close(plt.encode(i, x[i]), ref[f"plt_acts_{i}"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plt.reconstruct(x)[i], ref[f"plt_out_{i}"], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(clt.encode(i, x[i]), ref[f"clt_acts_{i}"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(clt.reconstruct(x)[i], ref["clt_out"][i], atol=1e-4, rtol=1e-5)
    ours = tmp_path / "ours"
    mine_plt, mine_clt = _plt("jumprelu"), _clt("jumprelu")
    mine_plt.save(ours / "plt", format="circuit-tracer")
    mine_clt.save(ours / "clt", format="circuit-tracer")
    subprocess.run([str(PEER), str(PEER_SCRIPT), "read", str(ours), str(tmp_path / "read.safetensors")], check=True,
                   timeout=600)
    got = load_file(str(tmp_path / "read.safetensors"))
    x = list(got["x"])
    for i in range(L):
        torch.testing.assert_close(got[f"plt_acts_{i}"], mine_plt.encode(i, x[i]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[f"plt_out_{i}"], mine_plt.reconstruct(x)[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[f"clt_acts_{i}"], mine_clt.encode(i, x[i]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got["clt_out"][i], mine_clt.reconstruct(x)[i], atol=1e-4, rtol=1e-4)
