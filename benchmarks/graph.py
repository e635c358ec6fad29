"""Attribution graphs: ours vs circuit-tracer 0.5 on the same GPT-2-small-shaped model and transcoders.

    python benchmarks/graph.py                     # 16-token prompt, 12 PLTs (2048 features, TopK 8), + SmolLM2 CLT
    python benchmarks/graph.py --no-peer --no-smollm2

Both tools load the same random-init GPT-2-small folder (common.make_gpt2_small_folder) and the same per-layer
transcoders, written here in circuit-tracer's layout (config.yaml + layer_{i}.safetensors, W_enc [n, d]). Its
file loader only builds ReLU transcoders, so each side sets TopK 8 itself (peer: circuit-tracer's TopK module,
which keeps the 8 largest pre-activations; ours: SparseCoder arch "topk", the same features when they are
positive, as they are here). Each tool runs in its own fresh process (ours: this script with --worker; the peer:
_peer_graph.py in benchmarks/.venv-circuit-tracer), so peak RSS (VmHWM) is the whole process, model included.
Prints `name ours peer ratio` lines and one line comparing the graphs: max |difference| of adjacency entries
relative to the largest edge, whether the active-feature sets and the pruned node sets (0.8 / 0.98) are equal.
--smollm2: a 64-token prompt on SmolLM2-135M with a random cross-layer transcoder (bounded memory:
max_feature_nodes), time and peak RSS only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PEER_VENVS, make_gpt2_small_folder, print_header, print_row, rss_mib  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def make_transcoders(folder: Path, n_layers=12, d=768, n=2048, seed=1) -> Path:
    """Random per-layer transcoders in circuit-tracer's layout (reused when present)."""
    import torch
    from safetensors.torch import save_file

    stamp = folder / "bench.json"
    want = {"n_layers": n_layers, "d": d, "n": n, "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for layer in range(n_layers):
        save_file({"W_enc": torch.randn(n, d, generator=g) * (4 / d**0.5),
                   "W_dec": torch.randn(n, d, generator=g) * (0.5 / d**0.5),
                   "b_enc": torch.zeros(n), "b_dec": torch.zeros(d)}, str(folder / f"layer_{layer}.safetensors"))
    (folder / "config.yaml").write_text(
        "model_kind: transcoder_set\nmodel_name: gpt2\nfeature_input_hook: ln2.hook_normalized\n"
        "feature_output_hook: hook_mlp_out\nscan: mechscope-bench\ntranscoders:\n"
        + "".join(f"  - layer_{i}.safetensors\n" for i in range(n_layers)))
    stamp.write_text(json.dumps(want))
    return folder


def topk_coders(folder: Path, k: int):
    """Our TopK SparseCoders from the circuit-tracer layout files (a TranscoderSet)."""
    import torch
    from safetensors.torch import load_file

    from mechscope.sae import TranscoderSet
    from mechscope.sae.coder import SparseCoder
    from mechscope.sae.config import SAEConfig

    coders = []
    files = sorted(folder.glob("layer_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    for layer, f in enumerate(files):
        sd = load_file(str(f))
        n, d = sd["W_enc"].shape
        c = SparseCoder(SAEConfig(arch="topk", d_in=d, n_latents=n, d_out=d, k=k,
                                  hook_in=f"blocks.{layer}.ln2.hook_normalized", hook_out=f"blocks.{layer}.hook_mlp_out"))
        with torch.no_grad():
            c.W_enc.copy_(sd["W_enc"].T)
            c.W_dec.copy_(sd["W_dec"])
            c.b_enc.copy_(sd["b_enc"])
            c.b_dec.copy_(sd["b_dec"])
        coders.append(c)
    return TranscoderSet.from_coders(coders)


def prompt_ids(n_tok: int, seed: int = 0) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [50256] + torch.randint(0, 50256, (n_tok - 1,), generator=g).tolist()  # BOS + random tokens


# ---------------------------------------------------------------------- worker: ours, in a fresh process
def worker(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    from safetensors.torch import save_file

    from mechscope.circuits import graphs
    from mechscope.models.loading import from_pretrained

    model = from_pretrained(a.model_dir)
    ts = topk_coders(Path(a.transcoders), a.k)
    ids = torch.tensor([[int(t) for t in a.tokens.split(",")]])
    rss_before = rss_mib()
    t0 = time.perf_counter()
    g = graphs.attribute(model, ids, ts, batch_size=a.batch_size)
    dt = time.perf_counter() - t0
    peak = rss_mib(peak=True)
    node_mask, _, _ = graphs.prune_masks(g, 0.8, 0.98)
    feats = torch.tensor([[n.layer, n.pos, n.feature] for n in g.nodes if n.kind == "feature"], dtype=torch.long)
    os.makedirs(a.out, exist_ok=True)
    save_file({"adjacency": g.dense().contiguous(), "features": feats, "node_mask": node_mask.to(torch.uint8)},
              os.path.join(a.out, "graph.safetensors"))
    print(json.dumps({"time_s": dt, "rss_peak_mib": peak, "rss_before_mib": rss_before, **g.scores}))


def worker_smollm2(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    from mechscope.circuits import graphs
    from mechscope.models.loading import from_pretrained
    from mechscope.sae import TranscoderSet
    from mechscope.sae.clt import CLTConfig, CrossLayerTranscoder

    model = from_pretrained("smollm2")
    c = model.cfg
    L = c.n_layers
    clt = CrossLayerTranscoder(CLTConfig(
        n_layers=L, d_in=c.d_model, d_out=c.d_model, n_features=a.clt_features, arch="topk", k=a.k,
        input_hooks=[f"blocks.{i}.ln2.hook_normalized" for i in range(L)],
        output_hooks=[f"blocks.{i}.hook_mlp_out" for i in range(L)], model_name=c.model_name)).init_weights(seed=0)
    ts = TranscoderSet.from_clt(clt)
    text = ("The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden barn near "
            "the river, where children play and birds sing songs of summer in the warm afternoon light")
    ids = model.to_tokens(text)[:, : a.n_tokens]
    rss_before = rss_mib()
    t0 = time.perf_counter()
    g = graphs.attribute(model, ids, ts, batch_size=a.batch_size, max_feature_nodes=a.max_feature_nodes)
    dt = time.perf_counter() - t0
    print(json.dumps({"time_s": dt, "rss_peak_mib": rss_mib(peak=True), "rss_before_mib": rss_before,
                      "n_tokens": ids.shape[1], "n_active": g.settings["n_active_features"],
                      "n_nodes": len(g.nodes), **g.scores}))


def _run(cmd: list[str], env_extra: dict | None = None, timeout: float = 3600) -> dict | None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env_extra or {})}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        print(f"[graph bench] {' '.join(cmd[:3])} failed (exit {p.returncode}):\n{p.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def compare(ours_dir: Path, peer_dir: Path) -> dict:
    """Adjacency / feature-set / pruned-node comparison of the two graphs (circuit-tracer node order)."""
    import torch
    from safetensors.torch import load_file

    o, p = load_file(str(ours_dir / "graph.safetensors")), load_file(str(peer_dir / "graph.safetensors"))
    pf = p["active_features"][p["selected_features"]]  # [F, 3] (layer, pos, feature), peer's graph order
    of = o["features"]
    same_feats = {tuple(r) for r in pf.tolist()} == {tuple(r) for r in of.tolist()}
    out = {"features_equal": same_feats, "n_features_ours": len(of), "n_features_peer": len(pf)}
    if not same_feats or o["adjacency"].shape != p["adjacency"].shape:
        return out | {"max_rel_diff": float("nan"), "pruned_equal": False}
    # map our feature order onto the peer's (both should be (layer, pos, feature) sorted; do not assume it)
    key = {tuple(r): i for i, r in enumerate(of.tolist())}
    perm = torch.tensor([key[tuple(r)] for r in pf.tolist()] + list(range(len(of), o["adjacency"].shape[0])))
    A = o["adjacency"][perm][:, perm]
    B = p["adjacency"].float()
    rel = float((A - B).abs().max() / B.abs().max())
    pruned_equal = bool(torch.equal(o["node_mask"][perm].bool(), p["node_mask"].bool()))
    return out | {"max_rel_diff": rel, "pruned_equal": pruned_equal}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["ours", "smollm2"])
    ap.add_argument("--model-dir")
    ap.add_argument("--transcoders")
    ap.add_argument("--tokens")
    ap.add_argument("--out")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--n-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--peer-batch-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/mechscope-bench-graph")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-python", help="python of the circuit-tracer venv (default benchmarks/.venv-circuit-tracer)")
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--clt-features", type=int, default=2048)
    ap.add_argument("--max-feature-nodes", type=int, default=4096)
    a = ap.parse_args()
    if a.worker == "ours":
        return worker(a)
    if a.worker == "smollm2":
        return worker_smollm2(a)

    work = Path(a.workdir)
    model_dir = make_gpt2_small_folder(work / "gpt2-rand")
    tc = make_transcoders(work / "transcoders")
    toks = ",".join(map(str, prompt_ids(a.n_tokens)))
    me = [sys.executable, str(Path(__file__).resolve())]
    src = {"PYTHONPATH": str(ROOT / "src")}
    ours = _run(me + ["--worker", "ours", "--model-dir", str(model_dir), "--transcoders", str(tc), "--tokens", toks,
                      "--out", str(work / "ours"), "--k", str(a.k), "--batch-size", str(a.batch_size),
                      "--threads", str(a.threads)], src)
    peer = None
    py = Path(a.peer_python) if a.peer_python else PEER_VENVS["circuit-tracer"] / "bin" / "python"
    if not a.no_peer:
        if not py.exists():
            print(f"[graph bench] {py} is missing: build it with `bash benchmarks/peer_venv.sh`", file=sys.stderr)
        else:
            peer = _run([str(py), str(HERE / "_peer_graph.py"), "--model-dir", str(model_dir), "--transcoders",
                         str(tc), "--tokens", toks, "--k", str(a.k), "--out", str(work / "peer"),
                         "--batch-size", str(a.peer_batch_size), "--threads", str(a.threads)], {"PYTHONPATH": ""})
    print_header("mechscope", "circuit-tracer")
    T = a.n_tokens
    print_row(f"graph {T} tok, 12 PLT TopK{a.k}: time (s)", ours and ours["time_s"], peer and peer["time_s"])
    print_row(f"graph {T} tok: peak RSS (MiB)", ours and ours["rss_peak_mib"], peer and peer["rss_peak_mib"])
    print_row("replacement score", ours and ours["replacement"], peer and peer["replacement"])
    print_row("completeness score", ours and ours["completeness"], peer and peer["completeness"])
    if ours and peer:
        c = compare(work / "ours", work / "peer")
        print(f"adjacency vs circuit-tracer: max |diff| / max |edge| = {c['max_rel_diff']:.2e}; active-feature sets "
              f"{'equal' if c['features_equal'] else 'DIFFERENT'} ({c['n_features_ours']} vs {c['n_features_peer']});"
              f" pruned node sets (0.8/0.98) {'equal' if c['pruned_equal'] else 'DIFFERENT'}", flush=True)
    if not a.no_smollm2:
        s = _run(me + ["--worker", "smollm2", "--n-tokens", "64", "--k", "16", "--batch-size", str(a.batch_size),
                       "--clt-features", str(a.clt_features), "--max-feature-nodes", str(a.max_feature_nodes),
                       "--threads", str(a.threads)], src)
        if s:
            print_row(f"SmolLM2 {s['n_tokens']} tok CLT ({s['n_active']} active, cap {a.max_feature_nodes}): time (s)",
                      s["time_s"], None, "-")
            print_row("SmolLM2 CLT graph: peak RSS (MiB)", s["rss_peak_mib"], None, "-")


if __name__ == "__main__":
    main()
