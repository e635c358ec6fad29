"""Controls for the report's detection scores: is "N features score > 0.8" something the SAE learned?

    python benchmarks/explanation_controls.py [REPORT_DIR]      (default mechscope-report; run the report first)

Scores, with the report's own settings (same layer, corpus, token budgets, scorer):
- the report's trained SAE and MLP-neuron baseline (read from the report's artifacts);
- a random-init TopK SAE of the same shape (decoder rows random unit vectors, encoder = decoder^T):
  what the pipeline gives a coder that learned nothing;
- shuffled explanations: each trained latent scored with another latent's explanation (chance level).
Prints one line per candidate: name, scored units, units > 0.8, mean and median balanced accuracy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mechscope.features.detection import DetectionSet, score_detection
from mechscope.features.explain import Explanation, load_explanations
from mechscope.features.pipeline import analyse_features
from mechscope.models.loading import from_pretrained
from mechscope.sae import SAEConfig, SparseCoder, io


def line(name: str, ba: torch.Tensor) -> None:
    ok = ba[~torch.isnan(ba)]
    print(f"{name:44s} {ok.numel():6d} {int((ok > 0.8).sum()):6d} {float(ok.mean()):8.3f} {float(ok.median()):8.3f}")


def main() -> None:
    rep = Path(sys.argv[1] if len(sys.argv) > 1 else "mechscope-report")
    res = json.loads((rep / "artifacts" / "results.json").read_text())
    c = res["config"]
    torch.set_num_threads(2)
    model = from_pretrained(c["model"])
    trained = io.load(rep / "artifacts" / "sae" / "sae")
    print(f"{'candidate':44s} {'scored':>6s} {'>0.8':>6s} {'mean':>8s} {'median':>8s}")
    for name in ("sae", "neurons"):
        s = json.loads((rep / "artifacts" / "features" / name / "summary.json").read_text())
        line(f"report: {name}", torch.tensor(s["scores"], dtype=torch.float64))
    rand = SparseCoder(SAEConfig(arch="topk", d_in=trained.cfg.d_in, n_latents=trained.cfg.n_latents,
                                 k=trained.cfg.k, hook_in=trained.cfg.hook_in)).init_weights(c["seed"] + 1)
    rand.b_dec.data.copy_(trained.b_dec.data)  # same centring as the trained SAE: only the dictionary is random
    out = rep / "artifacts" / "controls" / "random_sae"
    s = analyse_features(model, rand, out, corpus=c["corpus"], tokens=c["feature_tokens"],
                         score_tokens=c["score_tokens"], context_len=c["context_len"], n_pages=20,
                         neuronpedia=False, seed=c["seed"])
    line("random-init SAE, same shape", torch.tensor(s["scores"], dtype=torch.float64))
    folder = rep / "artifacts" / "features" / "sae"
    expl = load_explanations(folder / "explanations.json")
    dset = DetectionSet.load(folder / "detection")
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(expl), generator=g).tolist()
    shuffled = [Explanation(feature=e.feature, text=expl[j].text, terms=expl[j].terms, source="shuffled",
                            meta=e.meta) for e, j in zip(expl, perm)]
    line("trained SAE, shuffled explanations", score_detection(shuffled, dset, seed=c["seed"]).balanced_accuracy)


if __name__ == "__main__":
    main()
