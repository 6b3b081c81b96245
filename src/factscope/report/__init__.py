"""The report of a finished run: `write_report(DIR)` writes DIR/report.html (one self-contained file) and
DIR/figures/*.png; `compare.write_compare(DIRS, OUT)` puts several runs side by side.

Only saved tables are read (`load_run`), never a model, so a finished run renders (and re-renders) anywhere; no
module here imports torch. The package, by layer:

- `style`: fonts, palette, the plotly template and layout helpers every figure shares;
- `figures_dla`, `figures_heads`, `figures_causal`: one function per figure (a `Run` in, a plotly Figure out),
  with the `*_table` functions that prepare their data;
- `pngs`: matplotlib twins of the main figures (`save_pngs`);
- `text`: the prose — `findings` and the verdicts on the paper's claims (`departures`);
- `page`: the HTML page — the `SECTIONS` registry, `render_html`, `write_report`;
- `compare`: the cross-run page.
"""

from ..rundir import Run, load_run
from .page import SECTIONS, render_html, write_report
from .text import Finding, Verdict, departures, findings

__all__ = ["SECTIONS", "Finding", "Run", "Verdict", "departures", "findings", "load_run", "render_html", "write_report"]
