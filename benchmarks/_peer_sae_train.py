"""One PEER TopK SAE training candidate, as a worker process driven by `benchmarks/sae_train.py`.

Runs INSIDE the isolated peer venv (never the project env):

    benchmarks/.venv-peers/bin/python benchmarks/_peer_sae_train.py --tool sparsify [--d-in 768 ...]

Protocol (shared with `sae_train.py --worker`): the worker builds its coder and the seeded random
activations, prints one JSON line {"ready": true, "rss_base_mib": ...}, then answers commands read
from stdin, one JSON line each:
    run N        N training steps; replies {"times": [seconds per step, ...]}
    profile      one step under torch.profiler; replies {"ops": [[name, self_ms, calls], ...]}
    rss          replies {"rss_mib": VmRSS, "peak_mib": VmHWM}
    quit
Everything else the tools print goes to stderr.

Activations: torch.randn(n_batches, B, d_in) from torch.Generator().manual_seed(seed), cycled; the
project-side workers draw them identically (same torch version in both environments).

What one timed step is (each tool's own training-loop body, for an FVU / MSE TopK run, no AuxK since no
latent is dead within a benchmark, fp32, CPU, torch.set_num_threads(--threads)):
--tool sparsify      eai-sparsify 1.3.3 `SparseCoder(d_in, SparseCoderConfig(num_latents, k))` and what its
                     `Trainer.fit` does per batch with loss_fn="fvu": set_decoder_norm_to_unit_norm, the
                     batch variance, forward(x, y=x, dead_mask, total_variance) (its FusedEncoder with the
                     index_add_ backward; eager embedding_bag decoder: no Triton on CPU), (fvu +
                     auxk_alpha*auxk + multi_topk/8).backward(), did_fire update,
                     remove_gradient_parallel_to_decoder_directions, optimizer.step, zero_grad, the
                     dead-latent counters. --sparsify-opt adam: torch.optim.Adam (what its "adam" option
                     falls back to without bitsandbytes; same optimizer as ours); signum: its default
                     ScheduleFreeWrapper(SignSGD, momentum=0.95).
--tool saelens       sae-lens 6.54.12 TopKTrainingSAE (defaults: rescale_acts_by_decoder_norm=True,
                     dense activations) and the body of `SAETrainer._train_step`: training_forward_pass,
                     firing statistics, backward, clip_grad_norm_(1.0), Adam step, zero_grad.
--tool saelens-sparse   the same with use_sparse_activations=True (COO activations, torch.sparse.mm decode)
                     and rescale_acts_by_decoder_norm=False (with True its backward fails on CPU:
                     "Could not run 'aten::view' with arguments from the 'SparseCPU' backend").
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sae_worker import add_shape_args, rss, serve  # noqa: E402  (stdlib only: importable from the peer venv)

warnings.filterwarnings("ignore")


def make_batches(n_batches: int, batch: int, d_in: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_batches, batch, d_in, generator=g)


def build_sparsify(a, torch):
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder

    torch.manual_seed(a.seed)
    sae = SparseCoder(a.d_in, SparseCoderConfig(num_latents=a.n_latents, k=a.k), device="cpu", dtype=torch.float32)
    lr = 2e-4 / (sae.num_latents / 2**14) ** 0.5
    if a.sparsify_opt == "adam":
        opt = torch.optim.Adam(sae.parameters(), lr=lr)
    else:
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / (sae.num_latents / 2**14) ** 0.5)]),
                                  momentum=0.95)
        opt.train()
    tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
    auxk_alpha, dead_threshold = 0.0, 10_000_000  # its TrainConfig defaults

    def step(x):
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = tokens_since_fired > dead_threshold if auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())  # its running average of the FVU (a sync on GPU)
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            tokens_since_fired.add_(x.shape[0])
            tokens_since_fired[did_fire] = 0
            did_fire.zero_()

    return step


def build_saelens(a, torch, sparse: bool):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(a.seed)
    cfg = TopKTrainingSAEConfig(d_in=a.d_in, d_sae=a.n_latents, k=a.k, dtype="float32", device="cpu",
                                use_sparse_activations=sparse,
                                # the sparse path's backward fails with the decoder-norm rescaling
                                # ("aten::view ... SparseCPU"), so it runs without it
                                rescale_acts_by_decoder_norm=not sparse)
    sae = TopKTrainingSAE(cfg)
    lr = 2e-4 / math.sqrt(a.n_latents / 2**14)  # same rule as ours (SAELens' default lr is 3e-4)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(a.n_latents)
    act_freq = torch.zeros(a.n_latents)
    state = {"n": 0}

    def step(x):
        sae.train()
        dead = since_fired > 1000  # SAETrainer.dead_neurons (dead_feature_window default 1000)
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=state["n"], is_logging_step=False))
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            if did_fire.is_sparse:
                did_fire = did_fire.to_dense()
            since_fired.add_(1)
            since_fired[did_fire] = 0
            fs = firing.sum(0)
            act_freq.add_(fs.to_dense() if fs.is_sparse else fs)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        state["n"] += 1

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tool", required=True, choices=["sparsify", "saelens", "saelens-sparse"])
    add_shape_args(ap)
    ap.add_argument("--sparsify-opt", choices=["adam", "signum"], default="adam")
    a = ap.parse_args()
    sys.stdout = sys.stderr  # the tools' own prints must not corrupt the protocol
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    import torch

    torch.set_num_threads(a.threads)
    xs = make_batches(a.n_batches, a.batch, a.d_in, a.seed)
    base = rss("VmRSS:")  # after imports and the activations, before the coder exists
    if a.tool == "sparsify":
        step = build_sparsify(a, torch)
    else:
        step = build_saelens(a, torch, sparse=a.tool == "saelens-sparse")
    serve(step, xs, base)


if __name__ == "__main__":
    main()
