"""Run circuit-tracer 0.5's attribution on a local GPT-2 folder and per-layer transcoders; report time, memory
and the graph. Runs INSIDE the isolated venv benchmarks/.venv-circuit-tracer (started by benchmarks/graph.py):

    benchmarks/.venv-circuit-tracer/bin/python benchmarks/_peer_graph.py --model-dir D --transcoders T \
        --tokens 50256,12,... --k 8 --out OUT_DIR

Transcoders: circuit-tracer's per-layer layout (config.yaml + layer_{i}.safetensors with W_enc [n, d],
W_dec [n, d], b_enc, b_dec). Its file loader builds ReLU transcoders only, so the TopK activation is set here
(circuit_tracer.transcoder.activation_functions.TopK) on SingleLayerTranscoders loaded from those files.
Writes OUT_DIR/graph.safetensors (adjacency [n, n], active_features [F, 3], activation_values [F],
selected_features, logit_tokens, logit_probabilities, node_mask, edge_mask) and prints ONE JSON line:
{"time_s", "rss_peak_mib", "rss_before_mib", "n_active", "replacement", "completeness"}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import rss_mib  # noqa: E402  (stdlib-only at import: safe inside the peer venv)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--transcoders", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import torch
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph
    from circuit_tracer.transcoder.activation_functions import TopK
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    import yaml

    cfg = yaml.safe_load(open(os.path.join(a.transcoders, "config.yaml")))
    n_layers = len([f for f in os.listdir(a.transcoders) if f.startswith("layer_")])
    tcs = {}
    for layer in range(n_layers):
        sd = load_file(os.path.join(a.transcoders, f"layer_{layer}.safetensors"))
        n, d = sd["W_enc"].shape
        tc = SingleLayerTranscoder(d, n, TopK(a.k), layer, skip_connection="W_skip" in sd, device="cpu",
                                   dtype=torch.float32)
        tc.load_state_dict(sd, strict=False)
        tcs[layer] = tc
    ts = TranscoderSet(tcs, feature_input_hook=cfg["feature_input_hook"],
                       feature_output_hook=cfg["feature_output_hook"], scan="mechscope-bench")

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    hf = AutoModelForCausalLM.from_pretrained(a.model_dir)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as d:  # TL maps "gpt2" to a local folder when ./gpt2 exists
        os.symlink(os.path.abspath(a.model_dir), os.path.join(d, "gpt2"))
        os.chdir(d)
        try:
            model = ReplacementModel.from_pretrained_and_transcoders("gpt2", ts, hf_model=hf, tokenizer=tok,
                                                                     device="cpu", dtype=torch.float32)
        finally:
            os.chdir(cwd)
    del hf
    ids = torch.tensor([int(t) for t in a.tokens.split(",")])
    rss_before = rss_mib()
    t0 = time.perf_counter()
    graph = attribute(ids, model, batch_size=a.batch_size)
    dt = time.perf_counter() - t0
    peak = rss_mib(peak=True)
    pr = prune_graph(graph, 0.8, 0.98)
    rep, comp = compute_graph_scores(graph)
    os.makedirs(a.out, exist_ok=True)
    save_file({
        "adjacency": graph.adjacency_matrix.float().contiguous(),
        "active_features": graph.active_features.long().contiguous(),
        "activation_values": graph.activation_values.float().contiguous(),
        "selected_features": graph.selected_features.long().contiguous(),
        "logit_tokens": torch.tensor([t.vocab_idx for t in graph.logit_targets], dtype=torch.long),
        "logit_probabilities": graph.logit_probabilities.float().contiguous(),
        "node_mask": pr.node_mask.to(torch.uint8).contiguous(),
        "edge_mask": pr.edge_mask.to(torch.uint8).contiguous(),
    }, os.path.join(a.out, "graph.safetensors"))
    print(json.dumps({"time_s": dt, "rss_peak_mib": peak, "rss_before_mib": rss_before,
                      "n_active": int(graph.active_features.shape[0]), "replacement": rep, "completeness": comp}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
