"""Drawing what the analysis computes: step maps (data, circuitsvis view), matplotlib
figures, and the self-contained offline HTML report. Knows arrays and the shape of a
result (``.maps``, ``.layers``, ...), not the analysis types."""

from .plots import (
    plot_accuracy_by_difficulty,
    plot_group_bands,
    plot_metric_curves,
    plot_receiver_heads,
    plot_step_map,
)
from .report import Report, save_result_html
from .stepmaps import DEFAULT_VIEW, VIEWS, StepMapData, StepMapsView, step_map_data, step_maps_view, view_values
from .tables import readable_table

__all__ = [
    "DEFAULT_VIEW", "Report", "StepMapData", "StepMapsView", "VIEWS", "plot_accuracy_by_difficulty", "plot_group_bands",
    "plot_metric_curves", "plot_receiver_heads", "plot_step_map", "readable_table", "save_result_html", "step_map_data", "step_maps_view",
    "view_values",
]
