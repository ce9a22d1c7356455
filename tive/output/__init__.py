"""Stage 8, the output: a selection written as a subset file, a JSON report, a chart and a page."""
