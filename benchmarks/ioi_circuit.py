"""IOI circuit on a model: EAP-IG / EAP / attribution patching vs activation patching (Spearman on the top nodes),
faithfulness curve of the EAP-IG circuit and the zero / mean / resample table at the chosen size (the README numbers).

    python benchmarks/ioi_circuit.py [smollm2|tiny] [n_prompts]
"""

import sys
import time
from pathlib import Path

import torch

from mechscope import HookedTransformer
from mechscope.circuits.attribution import (
    attribution_patching,
    edge_attribution,
    evaluate_circuit,
    faithfulness_curve,
)
from mechscope.circuits.patching import activation_patching
from mechscope.circuits.tasks import ioi


def spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))

name, n = (sys.argv[1] if len(sys.argv) > 1 else "smollm2"), int(sys.argv[2]) if len(sys.argv) > 2 else 16
if name == "tiny":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tiny_lm

    model = make_tiny_lm(0, n_layers=3)
else:
    model = HookedTransformer.from_pretrained(name)
task = ioi(model, n, seed=0)
c, x, metric = task.clean_tokens, task.corrupted_tokens, task.metric
m_clean, m_corr = task.baseline(model)
print(f"IOI n={n} T={c.shape[1]}: metric clean {m_clean:.3f} corrupted {m_corr:.3f}")
t = time.time()
ig = edge_attribution(model, c, x, metric, method="eap-ig", steps=5)
print(f"eap-ig {time.time() - t:.1f}s")
t = time.time()
eap = edge_attribution(model, c, x, metric, method="eap")
print(f"eap {time.time() - t:.1f}s")
t = time.time()
act_h = activation_patching(model, c, x, metric, hook="result", granularity="head", direction="noise") - m_clean  # [L, H]
act_m = activation_patching(model, c, x, metric, hook="mlp_out", granularity="layer", direction="noise") - m_clean  # [L]
print(f"activation patching {time.time()-t:.1f}s")
order = act_h.flatten().abs().argsort(descending=True)[:10]
print("heads that matter (noising, metric change):",
      " ".join(f"L{int(i) // act_h.shape[1]}H{int(i) % act_h.shape[1]}:{float(act_h.flatten()[i]):+.3f}" for i in order))
attr_h = attribution_patching(model, c, x, metric, hook="result", granularity="head", direction="noise", delta=True)
act = torch.cat([act_h.flatten(), act_m.flatten()]).cpu()
for label, sc in (("eap-ig", torch.cat([ig.head_scores().flatten(), ig.mlp_scores()])),
                  ("eap", torch.cat([eap.head_scores().flatten(), eap.mlp_scores()])),
                  ("attribution patching (heads only)", None)):
    if sc is None:
        top = act_h.flatten().abs().argsort(descending=True)[:30]
        print(f"{label}: spearman top-30 heads {spearman(attr_h.flatten()[top], act_h.flatten()[top]):.3f}")
        continue
    for k in (20, 50):
        top = act.abs().argsort(descending=True)[:k]
        print(f"{label}: spearman top-{k} nodes {spearman(sc[top], act[top]):.3f}", end="; ")
    print(f"all {spearman(sc, act):.3f}")
ks = [50, 100, 200, 400, 800, 1600, 3200]
curve = faithfulness_curve(model, ig, c, x, metric, ks=ks, ablation="resample")
for row in curve:
    print(row)
k = next((r["k"] for r in curve if r["faithfulness_normalized"] >= 0.8), ks[-1])
res = evaluate_circuit(model, ig.top_k_edges(k), c, x, metric)
print(f"chosen k={k}")
print(res.table())
