/**
 * "Apply to cell": a renderer for `application/vnd.jupyter-gpumem.change+json`
 * ({"cell_id", "line", "old", "new"}, line 1-based), made by jupyter_gpumem.labext.change_bundle.
 * Its button replaces that line of that cell in the notebook model, if the line still reads `old`.
 */
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { Widget } from '@lumino/widgets';

export const CHANGE_MIME = 'application/vnd.jupyter-gpumem.change+json';

export interface IChange {
  cell_id: string;
  line: number;
  old: string;
  new: string;
}

/** Apply `change` to the cell with its id in `panel`; the sentence to show the user. */
export function applyChange(panel: NotebookPanel, change: IChange): { ok: boolean; text: string } {
  const cells = panel.content.model?.cells;
  let cell = null;
  for (let i = 0; cells && i < cells.length; i++) {
    if (cells.get(i).id === change.cell_id) {
      cell = cells.get(i);
      break;
    }
  }
  if (!cell) {
    return { ok: false, text: 'Not applied: the cell is no longer in this notebook.' };
  }
  const lines = cell.sharedModel.getSource().split('\n');
  const i = change.line - 1;
  if (i < 0 || i >= lines.length || lines[i].trimEnd() !== change.old.trimEnd()) {
    const now = i >= 0 && i < lines.length ? `it now reads "${lines[i].trim()}"` : 'it is gone';
    return {
      ok: false,
      text: `Not applied: line ${change.line} changed since (${now}). Edit it by hand.`
    };
  }
  lines[i] = change.new;
  cell.sharedModel.setSource(lines.join('\n'));
  return { ok: true, text: `Applied: line ${change.line} now reads "${change.new.trim()}".` };
}

class ChangeRenderer extends Widget implements IRenderMime.IRenderer {
  constructor(private _tracker: INotebookTracker) {
    super();
    this.addClass('jp-gpumem-change');
  }

  async renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    const change = model.data[CHANGE_MIME] as unknown as IChange;
    this.node.textContent = '';
    const what = document.createElement('code');
    what.textContent = `line ${change.line}: ${change.old.trim()}  →  ${change.new.trim()}`;
    const button = document.createElement('button');
    button.className = 'jp-mod-styled jp-mod-accept jp-gpumem-apply';
    button.textContent = 'Apply to cell';
    const result = document.createElement('span');
    result.className = 'jp-gpumem-change-result';
    result.setAttribute('role', 'status');
    button.onclick = () => {
      // the notebook this output is in; outside a notebook there is no cell to edit
      const panel = this._tracker.find(p => p.node.contains(this.node)) ?? null;
      const out = panel
        ? applyChange(panel, change)
        : { ok: false, text: 'Not applied: this output is not in a notebook.' };
      result.textContent = out.text;
      result.dataset.ok = String(out.ok);
      button.disabled = out.ok;
    };
    this.node.append(button, ' ', what, ' ', result);
  }
}

export function changeRendererFactory(tracker: INotebookTracker): IRenderMime.IRendererFactory {
  return {
    safe: true,
    mimeTypes: [CHANGE_MIME],
    defaultRank: 50,
    createRenderer: () => new ChangeRenderer(tracker)
  };
}
