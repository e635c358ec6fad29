"""mechscope.sae.io: round trips in every format, peer-written files, and hostile or broken files.

tests/sae/fixtures/peers was written by SAELens 6.54.12 and sparsify 1.3.3 with their own save code
(benchmarks/make_peer_sae_files.py regenerates it); each folder holds the peer's encodings of a
fixed input, which our loader must reproduce.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mechscope.errors import CorruptFileError, InputError, UnknownFormatError, UnsupportedArchitectureError
from mechscope.sae.coder import SparseCoder
from mechscope.sae.config import SAEConfig
from mechscope.sae.io import FORMATS, MultipleCodersError, detect_format, load, load_all, save
from mechscope.sae.io.common import threshold_to_log

PEERS = Path(__file__).parent / "fixtures" / "peers"
D, N, D_OUT = 16, 32, 12
HOOK = "blocks.1.hook_resid_post"

ARCHS = {  # name -> SAEConfig kwargs
    "relu": dict(arch="relu"),
    "relu_no_bdec": dict(arch="relu", apply_b_dec_to_input=False),
    "topk": dict(arch="topk", k=4),
    "topk_skip": dict(arch="topk", k=4, skip=True),
    "topk_transcode": dict(arch="topk", k=4, d_out=D, apply_b_dec_to_input=False),
    "batchtopk": dict(arch="batchtopk", k=4),
    "matryoshka": dict(arch="matryoshka", k=4, matryoshka_prefixes=[8, 16]),
    "jumprelu": dict(arch="jumprelu"),
    "jumprelu_no_bdec": dict(arch="jumprelu", apply_b_dec_to_input=False),
    "gated": dict(arch="gated"),
    "transcoder": dict(arch="relu", d_out=D_OUT, hook_out="blocks.1.hook_mlp_out"),
    "jumprelu_skip_transcoder": dict(arch="jumprelu", d_out=D_OUT, skip=True, hook_out="blocks.1.hook_mlp_out"),
}
SUPPORTED = {  # format -> the ARCHS it can express (everything else must be refused)
    "native": set(ARCHS),
    "saelens": {"relu", "relu_no_bdec", "topk", "topk_transcode", "batchtopk", "matryoshka", "jumprelu", "jumprelu_no_bdec", "gated",
                "transcoder", "jumprelu_skip_transcoder"},
    "sparsify": {"topk", "topk_skip", "topk_transcode"},
    "gemmascope": {"jumprelu_no_bdec"},
    "gemmascope2": {"jumprelu_no_bdec", "jumprelu_skip_transcoder"},
    "dictionary_learning": {"relu", "relu_no_bdec", "topk", "batchtopk", "matryoshka", "jumprelu_no_bdec", "gated"},
}


def make(name: str, seed: int = 0, **over) -> SparseCoder:
    kw = {**ARCHS[name], **over}
    if kw.get("d_out") and kw.get("arch") != "topk":
        kw.setdefault("apply_b_dec_to_input", False)
    coder = SparseCoder(SAEConfig(d_in=D, n_latents=N, hook_in=HOOK, model_name="tiny", **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in coder.named_parameters():
            if pname == "log_threshold":
                p.copy_(torch.empty(p.shape).uniform_(-3.0, -0.5, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        if hasattr(coder, "threshold"):
            coder.threshold.fill_(0.3)
    return coder


def x_in(rows: int = 6) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(1))


def assert_same_coder(a: SparseCoder, b: SparseCoder) -> None:
    x = x_in()
    assert torch.equal(a.encode(x), b.encode(x))
    assert torch.equal(a(x).out, b(x).out)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if k == "log_threshold":  # peers store t = exp(log t); the exact float32 t comes back
            assert torch.equal(sa[k].exp(), sb[k].exp()), k
        else:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_or_refusal(tmp_path, fmt, arch):
    coder = make(arch)
    if arch not in SUPPORTED[fmt]:
        with pytest.raises(UnsupportedArchitectureError):
            save(coder, tmp_path / "c", format=fmt)
        assert not (tmp_path / "c").exists()  # refused before writing anything
        return
    folder = save(coder, tmp_path / "c", format=fmt)
    assert detect_format(folder) == fmt
    back = load(folder)
    assert_same_coder(coder, back)
    assert back.cfg == coder.cfg  # hooks, k, prefixes, provenance survive via the stashed config


def test_native_round_trip_is_state_exact_and_keeps_bf16(tmp_path):
    coder = make("jumprelu", dtype="bfloat16")
    back = load(save(coder, tmp_path / "c"))
    assert back.W_enc.dtype == torch.bfloat16
    for k, v in coder.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_saelens_bf16_threshold_stays_float32(tmp_path):
    coder = make("batchtopk", dtype="bfloat16")  # the coder keeps its threshold buffer float32
    back = load(save(coder, tmp_path / "c", format="saelens"))
    assert back.W_enc.dtype == torch.bfloat16 and back.threshold.dtype == torch.float32
    assert_same_coder(coder, back)


def test_scales_are_folded_on_save(tmp_path):
    coder = make("relu")
    coder.cfg.input_scale = coder.cfg.output_scale = 2.5
    for fmt in ("native", "saelens", "dictionary_learning"):
        back = load(save(coder, tmp_path / fmt, format=fmt))
        assert back.cfg.input_scale == back.cfg.output_scale == 1.0
        x = x_in()
        torch.testing.assert_close(back(x).out, coder(x).out, rtol=1e-6, atol=1e-6)
    assert coder.cfg.input_scale == 2.5  # the caller's coder is untouched


def test_load_with_dtype_and_explicit_format(tmp_path):
    folder = save(make("topk"), tmp_path / "c", format="sparsify")
    back = load(folder, dtype=torch.float64, format="sparsify")
    assert back.W_enc.dtype == torch.float64 and back.cfg.dtype == "float64"
    with pytest.raises(InputError):
        load(folder, format="nope")
    with pytest.raises(InputError):
        save(make("topk"), tmp_path / "d", format="nope")


# ---------------------------------------------------------------------------- peer files


PEER_DIRS = sorted(p.parent.relative_to(PEERS).as_posix() for p in PEERS.rglob("reference.safetensors"))


def test_peer_fixtures_present():
    assert len(PEER_DIRS) >= 20, "regenerate with benchmarks/make_peer_sae_files.py in the peer venv"
    assert sum(f.stat().st_size for f in PEERS.rglob("*") if f.is_file()) < 1_000_000


@pytest.mark.parametrize("name", PEER_DIRS)
def test_peer_files_give_peer_encodings(name):
    ref = load_file(str(PEERS / name / "reference.safetensors"))
    coder = load(PEERS / name)
    acts, out = coder.encode(ref["x"]), coder(ref["x"]).out
    assert torch.equal(acts != 0, ref["acts"] != 0)  # the same latents fire
    torch.testing.assert_close(acts, ref["acts"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref["out"], rtol=1e-6, atol=1e-6)
    if name.startswith("saelens"):
        assert coder.cfg.hook_in == HOOK and coder.cfg.model_name == "tiny-model"
    if "transcoder" in name:
        assert coder.cfg.hook_out == "blocks.1.hook_mlp_out" and coder.cfg.out_dim == 12


def test_peer_architecture_mapping():
    arch = {n: load(PEERS / n).cfg for n in ("saelens_batchtopk", "saelens_matryoshka", "saelens_gated",
                                              "saelens_topk_rescale", "sparsify_transcode")}
    assert arch["saelens_batchtopk"].arch == "batchtopk" and arch["saelens_batchtopk"].k == 8
    assert arch["saelens_matryoshka"].matryoshka_prefixes == [16, 32, 64]
    assert arch["saelens_gated"].arch == "gated"
    assert arch["sparsify_transcode"].apply_b_dec_to_input is False
    assert arch["sparsify_transcode"].hook_out == "blocks.2.hook_mlp_out"


def test_folder_of_hooks(tmp_path):
    with pytest.raises(MultipleCodersError) as e:
        load(PEERS / "sparsify_run")
    assert e.value.names == ["layers.0", "layers.1.mlp"]
    coders = load_all(PEERS / "sparsify_run")
    assert list(coders) == ["layers.0", "layers.1.mlp"]
    assert coders["layers.0"].cfg.hook_in == "blocks.0.hook_resid_post"
    assert list(load_all(PEERS / "saelens_topk")) == [HOOK]
    assert detect_format(PEERS / "sparsify_topk") == "sparsify"  # one hook folder below: taken


def test_saelens_scale_unknown_raises_and_can_be_given(tmp_path):
    shutil.copytree(PEERS / "saelens_scaled", tmp_path / "s")
    (tmp_path / "s" / "activation_scaler.json").unlink()
    with pytest.raises(InputError, match="norm_scaling_factor"):
        load(tmp_path / "s")
    ref = load_file(str(tmp_path / "s" / "reference.safetensors"))
    coder = load(tmp_path / "s", norm_scaling_factor=2.5)
    torch.testing.assert_close(coder.encode(ref["x"]), ref["acts"], rtol=1e-6, atol=1e-6)
    with pytest.raises(InputError):
        load(PEERS / "sparsify_topk", norm_scaling_factor=2.0)


def test_saelens_pre_6_flat_config(tmp_path):
    src = PEERS / "saelens_topk"
    (tmp_path / "old").mkdir()
    shutil.copy(src / "sae_weights.safetensors", tmp_path / "old")
    (tmp_path / "old" / "cfg.json").write_text(json.dumps({
        "d_in": 16, "d_sae": 64, "dtype": "float32", "hook_point": "blocks.1.hook_resid_post", "hook_point_layer": 1,
        "model_name": "tiny-model", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 8},
        "apply_b_dec_to_input": True, "normalize_activations": False}))
    ref = load_file(str(src / "reference.safetensors"))
    coder = load(tmp_path / "old")
    assert coder.cfg.arch == "topk" and coder.cfg.k == 8 and coder.cfg.hook_in == HOOK
    torch.testing.assert_close(coder.encode(ref["x"]), ref["acts"], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- formats without a peer library


def _jumprelu_ref(p: dict[str, np.ndarray], x: np.ndarray):
    """Gemma Scope's own inference rule (no b_dec subtraction)."""
    pre = x @ p["W_enc"] + p["b_enc"]
    acts = (pre > p["threshold"]) * np.maximum(pre, 0)
    return acts, acts @ p["W_dec"] + p["b_dec"]


def test_gemmascope1_npz_and_path_metadata(tmp_path):
    rng = np.random.default_rng(0)
    p = {"W_enc": rng.normal(size=(D, N)), "W_dec": rng.normal(size=(N, D)), "b_enc": rng.normal(size=N) * 0.1,
         "b_dec": rng.normal(size=D), "threshold": rng.uniform(0.05, 0.5, size=N)}
    p = {k: v.astype(np.float32) for k, v in p.items()}
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_50"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **p)
    coder = load(folder / "params.npz")
    x = x_in().numpy()
    acts, out = _jumprelu_ref(p, x)
    torch.testing.assert_close(coder.encode(torch.from_numpy(x)), torch.from_numpy(acts), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(coder(torch.from_numpy(x)).out, torch.from_numpy(out), rtol=1e-5, atol=1e-5)
    c = coder.cfg
    assert (c.arch, c.apply_b_dec_to_input, c.hook_in, c.model_name) == ("jumprelu", False, "blocks.3.hook_resid_post",
                                                                         "gemma-2-2b")
    assert c.extra["gemmascope"]["width"] == 16384 and c.extra["gemmascope"]["l0"] == 50


def test_gemmascope2_affine_transcoder_and_clt(tmp_path):
    g = torch.Generator().manual_seed(2)
    t = {"w_enc": torch.randn(D, N, generator=g), "w_dec": torch.randn(N, D_OUT, generator=g),
         "b_enc": torch.randn(N, generator=g) * 0.1, "b_dec": torch.randn(D_OUT, generator=g),
         "threshold": torch.rand(N, generator=g) * 0.4 + 0.05, "affine_skip_connection": torch.randn(D, D_OUT, generator=g)}
    (tmp_path / "tc").mkdir()
    save_file(t, str(tmp_path / "tc" / "params.safetensors"))
    (tmp_path / "tc" / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "width": N, "model_name": "google/gemma-3-1b-pt", "type": "transcoder",
        "affine_connection": True, "hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.5.post_feedforward_layernorm.output"}))
    coder = load(tmp_path / "tc")
    x = x_in()
    pre = x @ t["w_enc"] + t["b_enc"]
    acts = (pre > t["threshold"]) * pre.relu()
    assert torch.equal(coder.encode(x), acts)
    torch.testing.assert_close(coder(x).out, acts @ t["w_dec"] + t["b_dec"] + x @ t["affine_skip_connection"])
    assert (coder.cfg.hook_in, coder.cfg.hook_out) == ("blocks.5.ln2.hook_normalized", "blocks.5.hook_mlp_out")
    t["w_dec"] = torch.randn(N, 3, D_OUT)  # a cross-layer transcoder
    save_file(t, str(tmp_path / "tc" / "params.safetensors"))
    with pytest.raises(UnsupportedArchitectureError):
        load(tmp_path / "tc")


def test_dictionary_learning_classes(tmp_path):
    g = torch.Generator().manual_seed(3)
    enc, dec = torch.randn(N, D, generator=g) * 0.4, torch.randn(D, N, generator=g) * 0.4
    b_enc, b_dec = torch.randn(N, generator=g) * 0.1, torch.randn(D, generator=g) * 0.1
    x = x_in()
    lin = {"encoder.weight": enc, "encoder.bias": b_enc, "decoder.weight": dec}
    cases = {  # dict_class -> (ae.pt, dictionary_learning's encode rule)
        "AutoEncoder": ({**lin, "bias": b_dec}, lambda: torch.relu((x - b_dec) @ enc.T + b_enc)),
        "BatchTopKSAE": ({**lin, "b_dec": b_dec, "k": torch.tensor(4, dtype=torch.int32),
                          "threshold": torch.tensor(0.2)},
                         lambda: (a := torch.relu((x - b_dec) @ enc.T + b_enc)) * (a > 0.2)),
        "JumpReluAutoEncoder": ({"W_enc": enc.T.contiguous(), "b_enc": b_enc, "W_dec": dec.T.contiguous(),
                                 "b_dec": b_dec, "threshold": torch.full((N,), 0.15)},
                                lambda: torch.relu((p := x @ enc.T + b_enc) * (p > 0.15))),
    }
    for cls, (sd, rule) in cases.items():
        folder = tmp_path / cls / "trainer_0"
        folder.mkdir(parents=True)
        torch.save(sd, folder / "ae.pt")
        (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": cls, "lm_name": "m", "layer": 2,
                                                                    "submodule_name": "resid_post_layer_2"}}))
        coder = load(folder)
        torch.testing.assert_close(coder.encode(x), rule(), rtol=1e-6, atol=1e-6)
        assert coder.cfg.hook_in == "blocks.2.hook_resid_post" and coder.cfg.model_name == "m"
    (tmp_path / "AutoEncoder" / "trainer_0" / "config.json").unlink()  # class guessed from tensor names
    assert load(tmp_path / "AutoEncoder").cfg.arch == "relu"


# ---------------------------------------------------------------------------- hostile and broken files


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_refused_without_running(tmp_path, how):
    marker = tmp_path / "pwned"
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    payload = {"encoder.weight": torch.zeros(N, D), "evil": _Evil(marker)}
    if how == "torch_zip":
        torch.save(payload, folder / "ae.pt")
    else:
        (folder / "ae.pt").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CorruptFileError, match="Refused"):
        load(folder)
    assert not marker.exists()


def test_npz_with_object_array_refused(tmp_path):
    marker = tmp_path / "pwned"
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((D, N), np.float32),
             threshold=np.array([_Evil(marker)], dtype=object))
    with pytest.raises(CorruptFileError):
        load(tmp_path)
    assert not marker.exists()


def test_unknown_format(tmp_path):
    with pytest.raises(UnknownFormatError, match="ae.pt"):  # the message lists what was looked for
        load(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(UnknownFormatError):
        load(tmp_path / "weights.bin")
    with pytest.raises(UnknownFormatError, match="does not exist"):
        load(tmp_path / "missing")


@pytest.mark.parametrize("fmt,file", [("native", "sae.safetensors"), ("saelens", "sae_weights.safetensors"),
                                      ("gemmascope", "params.npz"), ("dictionary_learning", "ae.pt"),
                                      ("native", "cfg.json")])
def test_truncated_file(tmp_path, fmt, file):
    folder = save(make("jumprelu_no_bdec" if fmt in ("gemmascope", "dictionary_learning") else "relu"),
                  tmp_path / "c", format=fmt)
    data = (folder / file).read_bytes()
    (folder / file).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError):
        load(folder, format=fmt)


def test_mismatched_shapes(tmp_path):
    folder = save(make("relu"), tmp_path / "c", format="saelens")
    t = load_file(str(folder / "sae_weights.safetensors"))
    t["W_dec"] = torch.zeros(N, D + 1)
    save_file(t, str(folder / "sae_weights.safetensors"))
    with pytest.raises(CorruptFileError, match="W_dec"):
        load(folder)
    folder = save(make("topk"), tmp_path / "n")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["config"]["n_latents"] = N * 2
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptFileError, match="shape"):
        load(folder)
    t = load_file(str(folder / "sae.safetensors"))
    del t["b_enc"]
    save_file(t, str(folder / "sae.safetensors"))
    with pytest.raises(CorruptFileError, match="missing"):
        load(folder)


# ---------------------------------------------------------------------------- JumpReLU threshold


def test_threshold_conversion_is_exact_where_possible():
    t = torch.rand(2000, generator=torch.Generator().manual_seed(4)) * 0.5 + 1e-3
    log_t = threshold_to_log(t)
    assert log_t.dtype == torch.float32
    assert (log_t.exp() == t).float().mean() > 0.6  # exp(float32) reaches about 70% of float32 values exactly
    assert ((log_t.exp() - t).abs() <= 8 * torch.finfo(torch.float32).eps * t).all()  # else within ulps
    back = threshold_to_log(log_t.exp())  # anything we wrote comes back with the identical threshold
    assert torch.equal(back.exp(), log_t.exp())


def test_zero_threshold_warns_and_acts_as_relu(tmp_path):
    coder = make("jumprelu_no_bdec")
    folder = save(coder, tmp_path / "c", format="gemmascope2")
    t = load_file(str(folder / "params.safetensors"))
    t["threshold"][:4] = 0.0
    t["threshold"][4:8] = -1.0
    save_file(t, str(folder / "params.safetensors"))
    with pytest.warns(UserWarning, match="<= 0"):
        back = load(folder)
    assert torch.isfinite(back.log_threshold).all()
    pre = back.pre_acts(x_in())
    assert torch.equal(back.encode(x_in())[:, :8], pre[:, :8].relu())
