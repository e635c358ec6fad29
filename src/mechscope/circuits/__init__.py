"""Circuits: activation and attribution patching, head detectors, lenses, circuit discovery.

    from mechscope import circuits
    task = circuits.tasks.ioi(model, 16)                          # clean / corrupted prompts + metric
    heat = circuits.activation_patching(model, task.clean_tokens, task.corrupted_tokens, task.metric,
                                        hook="resid_pre", granularity="position")    # [n_layers, pos]
    graph = circuits.edge_attribution(model, task.clean_tokens, task.corrupted_tokens, task.metric)  # EAP-IG
    circuits.evaluate_circuit(model, graph.top_k_edges(200), task.clean_tokens, task.corrupted_tokens,
                              task.metric).table()                # faithfulness, completeness x 3 ablations
    circuits.head_scores(model, "induction")                      # [n_layers, n_heads]
    circuits.logit_lens(model, tokens).kl_to_final                # [n_layers + 1]
    t = circuits.causal_trace(model, "The Eiffel Tower is located in the city of", subject="The Eiffel Tower",
                              kind="mlp")                          # t.effects [n_layers, pos] (Meng et al.)
"""

from mechscope.circuits import graphs, tasks
from mechscope.circuits.attribution import (
    CircuitResult,
    FaithfulnessResult,
    attribution_patching,
    edge_attribution,
    evaluate_circuit,
    faithfulness,
    faithfulness_curve,
    run_with_edges,
)
from mechscope.circuits.causal_trace import AverageTrace, CausalTrace, average_traces, causal_trace
from mechscope.circuits.dla import DLAResult, direct_logit_attribution
from mechscope.circuits.graph import Graph, GraphShape
from mechscope.circuits.heads import KINDS, detect_heads, head_scores
from mechscope.circuits.lens import (
    LensResult,
    LensTable,
    TunedLens,
    decode_resid,
    evaluate_lenses,
    logit_lens,
)
from mechscope.circuits.patching import (
    KLDivergence,
    LogitDiff,
    TokenProb,
    activation_patching,
    align_prompts,
    patch_attn_out,
    patch_block_components,
    patch_head_components,
    patch_head_out,
    patch_mlp_out,
    patch_resid,
)

__all__ = [
    "graphs", "tasks", "CircuitResult", "FaithfulnessResult", "attribution_patching", "edge_attribution", "evaluate_circuit",
    "faithfulness", "faithfulness_curve", "run_with_edges", "DLAResult", "direct_logit_attribution", "Graph",
    "GraphShape", "KINDS", "detect_heads", "head_scores", "LensResult", "LensTable", "TunedLens", "decode_resid",
    "evaluate_lenses", "logit_lens", "KLDivergence", "LogitDiff", "TokenProb", "activation_patching",
    "align_prompts", "patch_attn_out", "patch_block_components", "patch_head_components", "patch_head_out",
    "patch_mlp_out", "patch_resid", "AverageTrace", "CausalTrace", "average_traces", "causal_trace",
]
