"""The diagnosis panel's stylesheet: one ``<style>`` shown with the panel, its parts' CSS included.

Every rule is scoped under ``.gpumem-panel`` so nothing leaks into the page, and the panel wraps and
scrolls within any output width (long names break anywhere, tables scroll sideways). Colours are
JupyterLab's theme variables with a fallback, so the panel reads on light and dark themes.
"""

from __future__ import annotations

from jupyter_gpumem.ui import chart, devices
from jupyter_gpumem.ui.allocations import CSS as ALLOCATIONS_CSS

STYLE = (
    """<style>
.gpumem-panel{max-width:100%;min-width:0;overflow-wrap:anywhere}
.gpumem-panel .widget-html,.gpumem-panel .widget-html-content{max-width:100%;min-width:0}
.gpumem-panel .widget-html-content{white-space:normal;height:auto;line-height:1.45}
.gpumem-panel .gpumem-diag{max-width:100%;box-sizing:border-box}
.gpumem-panel .gpumem-diag table{display:block;max-width:100%;overflow-x:auto}
.gpumem-panel .gpumem-diag td,.gpumem-panel .gpumem-diag th{overflow-wrap:anywhere}
.gpumem-panel code{background:var(--jp-layout-color2,rgba(127,127,127,.15));padding:0 3px;
 overflow-wrap:anywhere}
.gpumem-panel pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:2px 0}
.gpumem-panel .gpumem-buttons{flex-wrap:wrap;gap:4px;max-width:100%}
.gpumem-panel .gpumem-buttons .jupyter-button{white-space:normal;height:auto;
 min-height:var(--jp-widgets-inline-height,28px);max-width:100%;text-align:left;
 line-height:1.3;padding:3px 10px}
.gpumem-panel .jupyter-button.mod-primary:disabled,
.gpumem-panel .jupyter-button.mod-primary[disabled]{background:var(--jp-layout-color3,#bdbdbd);
 color:var(--jp-ui-font-color1,#222);box-shadow:none;opacity:.7}
.gpumem-panel .gpumem-live{font-size:13px;padding:2px 0}
.gpumem-panel .gpumem-cancel-bar{padding:2px 0 4px}
.gpumem-panel .gpumem-cancel-note{font-size:12px;padding-left:8px}
.gpumem-panel .gpumem-ok{border-left:4px solid var(--jp-success-color1,#2e7d32);padding-left:8px}
.gpumem-panel .gpumem-bad{border-left:4px solid var(--jp-error-color1,#c62828);padding-left:8px}
.gpumem-panel .gpumem-ask{border-left:4px solid var(--jp-warn-color1,#c77c02);padding-left:8px}
.gpumem-panel .gpumem-run{border-left:4px solid var(--jp-brand-color1,#1976d2);padding-left:8px}
.gpumem-panel .gpumem-why{font-size:12px;color:var(--jp-ui-font-color1,#333)}
.gpumem-panel details summary{cursor:pointer}
.gpumem-panel dl{margin:2px 0}.gpumem-panel dd{margin:0 0 2px 1.5em}
"""
    + chart.CSS
    + devices.CSS
    + ALLOCATIONS_CSS
    + "</style>"
)
