"""TranscoderSet over per-layer (and skip) transcoders: the maths attribution graphs rely on, the model checks,
the replacement-model interventions and our folder format."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mechscope import sae
from mechscope.errors import InputError

D, N = 64, 48  # tiny_llama d_model; features per layer


def make_coders(n_layers=2, *, skip=False, arch="topk", seed=0, scales=(1.0, 1.0)):
    coders = []
    for layer in range(n_layers):
        cfg = sae.SAEConfig(arch=arch, d_in=D, n_latents=N, d_out=D, k=6 if arch == "topk" else None, skip=skip,
                            hook_in=f"blocks.{layer}.ln2.hook_normalized", hook_out=f"blocks.{layer}.hook_mlp_out",
                            input_scale=scales[0], output_scale=scales[1])
        c = sae.SparseCoder(cfg).init_weights(seed + layer)
        with torch.no_grad():
            c.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
            c.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
            if skip:
                c.W_skip.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + 2))
        coders.append(c)
    return coders


@pytest.mark.parametrize("skip,scales", [(False, (1.0, 1.0)), (True, (1.0, 1.0)), (True, (2.0, 0.5))])
def test_plt_maths_match_the_coders(skip, scales):
    coders = make_coders(skip=skip, scales=scales)
    ts = sae.TranscoderSet.from_coders(coders)
    assert ts.n_layers == 2 and not ts.cross_layer and ts.has_skip == skip
    assert ts.d_in == [D, D] and ts.d_out == [D, D] and ts.n_features == [N, N]
    assert ts.input_hooks == ["blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized"]
    assert ts.output_hooks == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    xs = [torch.randn(5, D, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    recon = ts.reconstruct(xs)
    for layer in range(2):
        acts = ts.encode(layer, xs[layer])  # [5, N]
        assert acts.shape == (5, N) and (acts != 0).sum(-1).max() <= 6
        torch.testing.assert_close(acts, coders[layer].encode(xs[layer]))
        assert ts.decoder(layer, 1 - layer) is None  # a PLT writes only to its own layer
        by_parts = acts @ ts.decoder(layer, layer) + ts.bias(layer)
        if skip:
            by_parts = by_parts + ts.skip_out(layer, xs[layer])
        else:
            assert ts.skip_out(layer, xs[layer]) is None
        torch.testing.assert_close(by_parts, coders[layer](xs[layer]).out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(recon[layer], by_parts, atol=1e-5, rtol=1e-5)
        # the linear read direction reproduces the pre-activations on raw input
        torch.testing.assert_close(xs[layer] @ ts.encoder(layer) + coders[layer].b_enc,
                                   ts.pre_acts(layer, xs[layer]), atol=1e-5, rtol=1e-5)


def test_from_coders_refuses_bad_input():
    coders = make_coders()
    with pytest.raises(InputError, match="layer order"):
        sae.TranscoderSet.from_coders(coders[::-1])
    with pytest.raises(InputError, match="SparseCoder"):
        sae.TranscoderSet.from_coders([torch.nn.Linear(2, 2)])
    bare = [sae.SparseCoder(dataclasses.replace(c.cfg, hook_in=None, hook_out=None)) for c in coders]
    with pytest.raises(InputError, match="input_hook="):
        sae.TranscoderSet.from_coders(bare)
    ts = sae.TranscoderSet.from_coders(bare, input_hook="blocks.{l}.hook_resid_mid", output_hook="blocks.{l}.hook_mlp_out")
    assert ts.input_hooks[1] == "blocks.1.hook_resid_mid"
    with pytest.raises(InputError, match="out of range"):
        ts.encode(2, torch.zeros(1, D))


def test_check_model(tiny_llama):
    model = tiny_llama[2]
    ts = sae.TranscoderSet.from_coders(make_coders())
    assert ts.check_model(model) is None
    with pytest.raises(sae.TranscoderMismatchError, match="cover 1 layers"):
        sae.TranscoderSet.from_coders(make_coders(1)).check_model(model)
    wide = [sae.SparseCoder(dataclasses.replace(c.cfg, d_in=D + 1)).init_weights() for c in make_coders()]
    with pytest.raises(sae.TranscoderMismatchError, match="width 64"):
        sae.TranscoderSet.from_coders(wide).check_model(model)
    missing = sae.TranscoderSet.from_coders(make_coders(), input_hook=None)
    missing.input_hooks = ["blocks.0.mlp.hook_in", "blocks.1.mlp.hook_in"]
    with pytest.raises(sae.TranscoderMismatchError, match="mlp.hook_in"):
        missing.check_model(model)
    other = sae.TranscoderSet.from_coders(make_coders())
    other.model_identity = {"name": "x", "config_hash": "0", "weights_fingerprint": "0", "processing": []}
    with pytest.raises(sae.TranscoderMismatchError, match="differs in config_hash"):
        other.check_model(model)


def test_replacement_interventions_splice_every_layer(tiny_llama):
    model = tiny_llama[2]
    ts = sae.TranscoderSet.from_coders(make_coders(skip=True))
    tokens = torch.tensor([[1, 5, 9, 13, 17, 21]])
    clean = model(tokens)
    kept = model(tokens, interventions=ts.replacement_interventions(keep=lambda layer: True))
    torch.testing.assert_close(kept, clean)  # recording inputs changes nothing
    names = ts.input_hooks + ts.output_hooks
    logits, cache = model.run_with_cache(tokens, names_filter=names, interventions=ts.replacement_interventions())
    assert (logits - clean).abs().max() > 1e-3  # the random transcoders change the output
    xs = [cache[h][0] for h in ts.input_hooks]  # [T, D] the inputs of the replaced run
    for layer, pred in enumerate(ts.reconstruct(xs)):
        torch.testing.assert_close(cache[ts.output_hooks[layer]][0], pred, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_save_load_roundtrip(tmp_path, arch):
    ts = sae.TranscoderSet.from_coders(make_coders(arch=arch, skip=arch == "jumprelu", scales=(2.0, 0.5)))
    ts.model_name = "tiny"
    ts.save(tmp_path / "ts")
    back = sae.load_transcoders(tmp_path / "ts")
    assert isinstance(back, sae.TranscoderSet) and back.input_hooks == ts.input_hooks
    assert back.output_hooks == ts.output_hooks and back.model_name == "tiny" and back.has_skip == ts.has_skip
    xs = [torch.randn(7, D, generator=torch.Generator().manual_seed(3 + i)) for i in range(2)]
    for a, b in zip(ts.reconstruct(xs), back.reconstruct(xs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ts.encode(1, xs[1]), back.encode(1, xs[1]), atol=1e-5, rtol=1e-5)


def test_load_transcoders_typed_errors(tmp_path):
    from mechscope.errors import CorruptFileError, UnknownFormatError

    with pytest.raises(UnknownFormatError, match="does not exist"):
        sae.load_transcoders(tmp_path / "nope")
    ts = sae.TranscoderSet.from_coders(make_coders())
    ts.save(tmp_path / "ts")
    import shutil

    shutil.rmtree(tmp_path / "ts" / "layer_1")
    with pytest.raises(CorruptFileError, match="layer_1"):
        sae.load_transcoders(tmp_path / "ts")
