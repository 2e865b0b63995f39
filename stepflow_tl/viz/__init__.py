"""Drawing what the analysis computes: step maps (data, circuitsvis view), matplotlib
figures, and the self-contained offline HTML report. Knows arrays and the shape of a
result (``.maps``, ``.layers``, ...), not the analysis types."""

from .plots import plot_accuracy_by_difficulty, plot_group_bands, plot_metric_curves, plot_step_map
from .report import METRIC_LEGEND, Report, save_result_html
from .stepmaps import StepMapData, StepMapsView, step_map_data, step_maps_view

__all__ = [
    "METRIC_LEGEND", "Report", "StepMapData", "StepMapsView", "plot_accuracy_by_difficulty", "plot_group_bands",
    "plot_metric_curves", "plot_step_map", "save_result_html", "step_map_data", "step_maps_view",
]
