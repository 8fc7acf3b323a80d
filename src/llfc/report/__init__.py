"""Results of a run: JSON schema (docs/results.md), CSV tables, figures, summary table, HTML report."""

from llfc.report.html import write_html_report
from llfc.report.plots import plot_all
from llfc.report.summary import summary_table, worst_layer
from llfc.report.tables import write_tables

__all__ = ["plot_all", "summary_table", "worst_layer", "write_html_report", "write_tables"]
