"""Attribution graphs (Ameisen et al. 2025, "Circuit Tracing"): a transcoder replacement model of one prompt,
the direct effects between its features, pruning, scores and interventions that test the graph's predictions.

    from mechscope import circuits, sae
    ts = sae.load_transcoders("transcoders/")                      # per-layer or cross-layer transcoders
    g = circuits.graphs.attribute(model, "The capital of France is", ts)
    gp = circuits.graphs.prune(g)                                   # node 0.8 / edge 0.98 influence thresholds
    g.scores                                                        # {"replacement": ..., "completeness": ...}
    circuits.graphs.write_graph_json(gp, "out/france.json")         # Neuronpedia / circuit-tracer graph file
    circuits.graphs.write_explorer("out/france.json", "out/france.html")   # interactive page
"""

from mechscope.circuits.graphs.attribution import attribute, logit_targets
from mechscope.circuits.graphs.graph import AttributionGraph, Node, node_id
from mechscope.circuits.graphs.intervene import (
    FeatureEdit,
    feature_interventions,
    predicted_change,
    predicted_logit_change,
)
from mechscope.circuits.graphs.prune import graph_scores, influence, normalize_matrix, prune, prune_masks
from mechscope.circuits.graphs.replacement import ReplacementModel

__all__ = ["AttributionGraph", "FeatureEdit", "Node", "ReplacementModel", "attribute", "feature_interventions",
           "graph_scores", "influence", "logit_targets", "node_id", "normalize_matrix", "predicted_change",
           "predicted_logit_change",
           "prune", "prune_masks"]

# --- graph files and the explorer (h-gjson)
from mechscope.circuits.graphs.explorer import (  # noqa: E402
    UnknownGraphError,
    explorer_html,
    feature_details,
    graph_feature_stats,
    graph_path,
    save_posted_graph,
    served_explorer,
    write_explorer,
)
from mechscope.circuits.graphs.graph_json import (  # noqa: E402
    GraphFile,
    GraphFormatError,
    GraphSchemaVersionError,
    UnknownNodeError,
    add_to_graph_index,
    graph_schema,
    graph_to_json,
    read_graph_json,
    validate_graph_json,
    write_graph_json,
)

__all__ += [
    "GraphFile", "GraphFormatError", "GraphSchemaVersionError", "UnknownGraphError", "UnknownNodeError",
    "add_to_graph_index", "explorer_html", "feature_details", "graph_feature_stats", "graph_path", "graph_schema",
    "graph_to_json",
    "read_graph_json", "save_posted_graph", "served_explorer", "validate_graph_json", "write_explorer",
    "write_graph_json",
]
