"""Attribution graphs: transcoder replacement model, attribution, pruning, graph files and the explorer."""

# --- graph files and the explorer (h-gjson)
from mechscope.circuits.graphs.explorer import (
    UnknownGraphError,
    explorer_html,
    feature_details,
    graph_path,
    save_posted_graph,
    served_explorer,
    write_explorer,
)
from mechscope.circuits.graphs.graph_json import (
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

__all__ = [
    "GraphFile", "GraphFormatError", "GraphSchemaVersionError", "UnknownNodeError", "add_to_graph_index",
    "explorer_html", "feature_details", "graph_schema", "graph_to_json", "read_graph_json", "validate_graph_json",
    "write_explorer", "write_graph_json", "UnknownGraphError", "graph_path", "save_posted_graph", "served_explorer",
]
