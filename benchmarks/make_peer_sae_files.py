"""Peer-written SAE files and their encodings, for mechscope.sae.io's compatibility tests.

Three modes (the peers live only in benchmarks/.venv-peers; mechscope only in the project env):

    # 1. peer venv: write tiny SAEs with SAELens's and sparsify's OWN save code, plus their
    #    encode/forward outputs on a fixed input (reference.safetensors) -> tests/sae/fixtures/peers
    benchmarks/.venv-peers/bin/python benchmarks/make_peer_sae_files.py [--out DIR]
    # 2. project env: write mechscope coders in SAELens / sparsify format (+ our outputs)
    python benchmarks/make_peer_sae_files.py --write-ours /tmp/ours
    # 3. peer venv: load those with SAELens / sparsify and compare with our outputs
    benchmarks/.venv-peers/bin/python benchmarks/make_peer_sae_files.py --check /tmp/ours

Prints one line per case: `name  max|acts diff|  max|out diff|  exact|close|FAIL`.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

D_IN, D_SAE, D_OUT, K, N_TOK = 16, 64, 12, 8, 6
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "tests" / "sae" / "fixtures" / "peers"
REF = "reference.safetensors"


def fixed_input(d: int = D_IN) -> torch.Tensor:
    return torch.randn(N_TOK, d, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Seeded random weights: N(0, 0.3) matrices/biases, thresholds in [0.05, 0.35], r_mag ~ N(0, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        if "threshold" in name:
            p.copy_(torch.rand(p.shape, generator=g) * 0.3 + 0.05)
        elif "r_mag" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def write_reference(folder: Path, x: torch.Tensor, acts: torch.Tensor, out: torch.Tensor) -> None:
    save_file({"x": x.contiguous(), "acts": acts.detach().contiguous(), "out": out.detach().contiguous()},
              str(folder / REF))


def report(name: str, acts: torch.Tensor, out: torch.Tensor, ref: dict[str, torch.Tensor]) -> bool:
    da = (acts - ref["acts"]).abs().max().item()
    do = (out - ref["out"]).abs().max().item()
    exact = torch.equal(acts, ref["acts"]) and torch.equal(out, ref["out"])
    ok = exact or (da <= 1e-5 and do <= 1e-5)
    print(f"{name:40s} {da:.2e} {do:.2e} {'exact' if exact else 'close' if ok else 'FAIL'}")
    return ok


# ---------------------------------------------------------------------------- mode 1: peers write


def make_saelens(out: Path) -> None:
    from sae_lens import (
        GatedSAE,
        GatedSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
        Transcoder,
        TranscoderConfig,
    )
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAE, SAEMetadata
    from sae_lens.training.activation_scaler import ActivationScaler

    def meta(**kw):
        return SAEMetadata(model_name="tiny-model", hook_name="blocks.1.hook_resid_post", **kw)

    tc_meta = dict(hook_name_out="blocks.1.hook_mlp_out")
    x = fixed_input()
    cases = {
        "standard": (StandardSAE, StandardSAEConfig(D_IN, D_SAE, metadata=meta())),
        "standard_no_bdec": (StandardSAE, StandardSAEConfig(D_IN, D_SAE, apply_b_dec_to_input=False,
                                                            metadata=meta())),
        "topk": (TopKSAE, TopKSAEConfig(D_IN, D_SAE, k=K, metadata=meta())),
        "topk_rescale": (TopKSAE, TopKSAEConfig(D_IN, D_SAE, k=K, rescale_acts_by_decoder_norm=True, metadata=meta())),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig(D_IN, D_SAE, metadata=meta())),
        "gated": (GatedSAE, GatedSAEConfig(D_IN, D_SAE, metadata=meta())),
        "transcoder": (Transcoder, TranscoderConfig(D_IN, D_SAE, d_out=D_OUT, apply_b_dec_to_input=False,
                                                    metadata=meta(**tc_meta))),
        "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig(D_IN, D_SAE, d_out=D_OUT, apply_b_dec_to_input=False,
                                                                 metadata=meta(**tc_meta))),
        "jumprelu_transcoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig(
            D_IN, D_SAE, d_out=D_OUT, apply_b_dec_to_input=False, metadata=meta(**tc_meta))),
        "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig(
            D_IN, D_SAE, d_out=D_OUT, apply_b_dec_to_input=False, metadata=meta(**tc_meta))),
    }
    for i, (name, (cls, cfg)) in enumerate(cases.items()):
        sae = cls(cfg)
        randomize(sae, seed=100 + i)
        folder = out / f"saelens_{name}"
        sae.save_model(folder)
        write_reference(folder, x, sae.encode(x), sae(x))

    # expected_average_only_in: the factor lives in activation_scaler.json (trainer checkpoints);
    # the reference is what SAELens's own fold gives (the SAE that takes raw activations)
    sae = StandardSAE(StandardSAEConfig(D_IN, D_SAE, normalize_activations="expected_average_only_in", metadata=meta()))
    randomize(sae, seed=150)
    folder = out / "saelens_scaled"
    sae.save_model(folder)
    ActivationScaler(scaling_factor=2.5).save(str(folder / "activation_scaler.json"))
    folded = copy.deepcopy(sae)
    folded.fold_activation_norm_scaling_factor(2.5)
    write_reference(folder, x, folded.encode(x), folded(x))

    # BatchTopK / Matryoshka: SAELens saves these for inference as JumpReLU (+ training metadata);
    # the training checkpoint (save_model) of the same SAE must give the same inference outputs
    for name, cls, cfg in (
        ("batchtopk", BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig(D_IN, D_SAE, k=K, metadata=meta())),
        ("matryoshka", MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig(
            D_IN, D_SAE, k=K, matryoshka_widths=[16, 32, D_SAE], metadata=meta())),
    ):
        sae = cls(cfg)
        randomize(sae, seed=160 if name == "batchtopk" else 170)
        sae.topk_threshold = torch.tensor(0.25, dtype=torch.double)
        inf, train = out / f"saelens_{name}", out / f"saelens_{name}_training"
        sae.save_inference_model(inf)
        sae.save_model(train)
        loaded = SAE.load_from_disk(inf)
        acts, y = loaded.encode(x), loaded(x)
        write_reference(inf, x, acts, y)
        write_reference(train, x, acts, y)


def make_sparsify(out: Path) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    x = fixed_input()
    cases = {
        "sparsify_topk/layers.3": SparseCoderConfig(num_latents=D_SAE, k=K),
        "sparsify_skip/layers.3": SparseCoderConfig(num_latents=D_SAE, k=K, skip_connection=True),
        "sparsify_transcode/layers.2.mlp": SparseCoderConfig(num_latents=D_SAE, k=K, transcode=True),
        "sparsify_transcode_skip/layers.2.mlp": SparseCoderConfig(num_latents=D_SAE, k=K, transcode=True,
                                                                   skip_connection=True),
        "sparsify_run/layers.0": SparseCoderConfig(num_latents=D_SAE, k=K),
        "sparsify_run/layers.1.mlp": SparseCoderConfig(num_latents=D_SAE, k=K, multi_topk=True),
    }
    for i, (name, cfg) in enumerate(cases.items()):
        sae = SparseCoder(D_IN, cfg)
        randomize(sae, seed=200 + i)
        folder = out / name
        sae.save_to_disk(folder)
        write_reference(folder, x, *_sparsify_run(sae, x))


def _sparsify_run(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense top-k latents and the k-latent output (+ skip). Not forward(): with multi_topk=True its
    sae_out (and latents) come from 4k latents, a training-loss detail that would leak into inference."""
    top_acts, top_idx, _ = sae.encode(x)
    dense = torch.zeros(x.shape[0], sae.num_latents, dtype=top_acts.dtype).scatter(-1, top_idx, top_acts)
    y = sae.decode(top_acts, top_idx)
    if sae.W_skip is not None:
        y = y + x.to(sae.dtype) @ sae.W_skip.mT
    return dense, y


# ---------------------------------------------------------------------------- mode 2: we write


def write_ours(out: Path) -> None:
    sys.path.insert(0, str(HERE.parent / "src"))
    from mechscope.sae.coder import SparseCoder
    from mechscope.sae.config import SAEConfig
    from mechscope.sae.io import save

    x = fixed_input()
    hook = "blocks.1.hook_resid_post"
    tc = dict(d_out=D_OUT, apply_b_dec_to_input=False, hook_out="blocks.1.hook_mlp_out")
    cases = {
        "saelens/relu": dict(arch="relu"),
        "saelens/relu_no_bdec": dict(arch="relu", apply_b_dec_to_input=False),
        "saelens/topk": dict(arch="topk", k=K),
        "saelens/jumprelu": dict(arch="jumprelu"),
        "saelens/jumprelu_no_bdec": dict(arch="jumprelu", apply_b_dec_to_input=False),
        "saelens/gated": dict(arch="gated"),
        "saelens/batchtopk": dict(arch="batchtopk", k=K),
        "saelens/matryoshka": dict(arch="matryoshka", k=K, matryoshka_prefixes=[16, 32]),
        "saelens/transcoder": dict(arch="relu", **tc),
        "saelens/skip_transcoder": dict(arch="relu", skip=True, **tc),
        "saelens/jumprelu_transcoder": dict(arch="jumprelu", **tc),
        "saelens/jumprelu_skip_transcoder": dict(arch="jumprelu", skip=True, **tc),
        "saelens/scaled_relu": dict(arch="relu", input_scale=2.5, output_scale=2.5),
        "sparsify/topk": dict(arch="topk", k=K),
        "sparsify/topk_skip": dict(arch="topk", k=K, skip=True),
        "sparsify/transcode": dict(arch="topk", k=K, d_out=D_IN, apply_b_dec_to_input=False),
        "sparsify/transcode_skip": dict(arch="topk", k=K, d_out=D_IN, apply_b_dec_to_input=False, skip=True),
    }
    for i, (name, kw) in enumerate(cases.items()):
        fmt, case = name.split("/")
        coder = SparseCoder(SAEConfig(d_in=D_IN, n_latents=D_SAE, hook_in=hook, **kw))
        randomize(coder, seed=300 + i)
        with torch.no_grad():
            if hasattr(coder, "log_threshold"):
                coder.log_threshold.copy_(torch.empty(D_SAE).uniform_(-3, -1.2, generator=torch.Generator().manual_seed(i)))
            if hasattr(coder, "threshold"):
                coder.threshold.fill_(0.25)
        folder = out / f"{fmt}_{case}"
        save(coder, folder, format=fmt)
        write_reference(folder, x, coder.encode(x), coder(x).out)
        (folder / "peer.json").write_text(json.dumps({"format": fmt}))
    print(f"wrote {len(cases)} coders to {out}")


# ---------------------------------------------------------------------------- mode 3: peers read


def check(out: Path) -> bool:
    from sae_lens.saes.sae import SAE
    from sparsify import SparseCoder

    ok = True
    for folder in sorted(p for p in out.iterdir() if (p / "peer.json").is_file()):
        fmt = json.loads((folder / "peer.json").read_text())["format"]
        ref = load_file(str(folder / REF))
        x = ref["x"]
        if fmt == "saelens":
            sae = SAE.load_from_disk(folder)
            acts, y = sae.encode(x), sae(x)
        else:
            sae = SparseCoder.load_from_disk(folder)
            acts, y = _sparsify_run(sae, x)
        ok &= report(f"{fmt} loads ours: {folder.name}", acts, y, ref)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="mode 1 output folder")
    ap.add_argument("--write-ours", type=Path, help="mode 2 (project env): write our coders here")
    ap.add_argument("--check", type=Path, help="mode 3 (peer venv): load these with the peers and compare")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.write_ours:
        write_ours(args.write_ours)
    elif args.check:
        sys.exit(0 if check(args.check) else 1)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        for old in args.out.iterdir():  # only what this script writes
            if old.is_dir() and old.name.startswith(("saelens_", "sparsify_")):
                shutil.rmtree(old)
        make_saelens(args.out)
        make_sparsify(args.out)
        size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
        print(f"wrote peer fixtures to {args.out} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
