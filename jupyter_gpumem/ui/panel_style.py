"""The diagnosis panel's stylesheet: one ``<style>`` shown with the panel, its parts' CSS included.

Every rule is scoped under ``.gpumem-panel`` so nothing leaks into the page, and the panel wraps
within any output width: prose breaks between words (a long name anywhere), a table cell never
inside a word or a number, and under 600 px a table's rows stack (a container query: the output's
width, not the window's). Colours are JupyterLab's theme variables with a fallback, so the panel
reads on light and dark themes; where a theme's own colour is under WCAG AA on its background
(the warning button, 2.7:1) the panel sets one per theme. Keyboard focus: a 2 px ring, off the
element, in a colour >= 3:1 on the page on both themes.
"""

from __future__ import annotations

from jupyter_gpumem.ui import chart, devices
from jupyter_gpumem.ui.allocations import CSS as ALLOCATIONS_CSS

STYLE = (
    """<style>
.gpumem-panel{max-width:100%;min-width:0;overflow-wrap:anywhere;container-type:inline-size}
.gpumem-panel .widget-html,.gpumem-panel .widget-html-content{max-width:100%;min-width:0}
.gpumem-panel .widget-html-content{white-space:normal;height:auto;line-height:1.45}
.gpumem-panel .gpumem-diag{max-width:100%;box-sizing:border-box}
.gpumem-panel table{max-width:100%}
.gpumem-panel td,.gpumem-panel th,.gpumem-panel td code{overflow-wrap:normal;word-break:normal}
.gpumem-panel td.num,.gpumem-panel th,.gpumem-panel .gpumem-diag td:nth-child(-n+3){
 white-space:nowrap}
@container (max-width:600px){
 .gpumem-panel .gpumem-diag table,.gpumem-panel .gpumem-diag tbody{display:block}
 .gpumem-panel .gpumem-diag tr{display:flex;flex-wrap:wrap;column-gap:10px;padding:3px 0;
  border-bottom:1px solid var(--jp-border-color2,#e0e0e0)}
 .gpumem-panel .gpumem-diag tr:first-child{display:none}
 .gpumem-panel .gpumem-diag td{display:block;padding:0}
 .gpumem-panel .gpumem-diag td:nth-child(n+4){flex:1 1 100%;overflow-wrap:break-word}
 .gpumem-panel .gpumem-diag td:empty{display:none}
}
.gpumem-panel .gpumem-sr{position:absolute;width:1px;height:1px;overflow:hidden;
 clip:rect(0 0 0 0);clip-path:inset(50%);white-space:nowrap}
.gpumem-panel.gpumem-panel button:focus:enabled,.gpumem-panel .gpumem-live:focus,
.gpumem-panel summary:focus-visible{outline:2px solid #1a5fb4;outline-offset:2px}
[data-jp-theme-light='false'] .gpumem-panel.gpumem-panel button:focus:enabled,
[data-jp-theme-light='false'] .gpumem-panel .gpumem-live:focus,
[data-jp-theme-light='false'] .gpumem-panel summary:focus-visible{outline-color:#8ab4f8}
.gpumem-panel .jupyter-button.mod-warning{background:#8a4f00;color:#fff}
[data-jp-theme-light='false'] .gpumem-panel .jupyter-button.mod-warning{background:#ffc266;
 color:#1a1a1a}
.gpumem-panel .jupyter-button:disabled{opacity:.55;cursor:not-allowed}
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
