"""Plots (PNG bytes + the plotted data) and, later, the HTML report built from them."""

from mechscope.viz.graph_plot import attribution_graph_plot
from mechscope.viz.plots import (
    DPI,
    Plot,
    circuit_graph,
    dla_bars,
    head_grid,
    lens_kl_curve,
    lens_table,
    lens_table_from_result,
    patching_heatmap,
    probe_sweep_curve,
)

__all__ = ["DPI", "Plot", "attribution_graph_plot", "circuit_graph", "dla_bars", "head_grid", "lens_kl_curve",
           "lens_table", "lens_table_from_result", "patching_heatmap", "probe_sweep_curve"]
