/**
 * jupyter-gpumem: JupyterLab's side of jupyter_gpumem. Everything in the Python package also works
 * without it (plain ipywidgets); this adds what only the page can do.
 */
import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { IMainMenu } from '@jupyterlab/mainmenu';
import { INotebookTracker } from '@jupyterlab/notebook';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Signal } from '@lumino/signaling';

import { changeRendererFactory } from './change';
import { DEFAULT_OPTIONS, IMeterOptions, MeterWidget } from './meter';

const PLUGIN_ID = 'jupyter-gpumem:plugin';

const OPEN_SIDEBAR = 'jupyter-gpumem:open-sidebar';

// Silent: no prompt number, no history, no output in any cell.
const OPEN_SIDEBAR_CODE = [
  'def _jupyter_gpumem_open_sidebar():',
  '    ip = get_ipython()',
  "    if 'jupyter_gpumem' not in ip.extension_manager.loaded:",
  "        ip.run_line_magic('load_ext', 'jupyter_gpumem')",
  "    ip.run_line_magic('gpumem', 'sidebar')",
  '_jupyter_gpumem_open_sidebar()',
  'del _jupyter_gpumem_open_sidebar'
].join('\n');

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'GPU memory meter in the status bar, a GPU memory sidebar command, Apply to cell.',
  autoStart: true,
  requires: [INotebookTracker, IRenderMimeRegistry],
  optional: [IStatusBar, ICommandPalette, IMainMenu, ILabShell, ISettingRegistry],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    rendermime: IRenderMimeRegistry,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null,
    mainMenu: IMainMenu | null,
    labShell: ILabShell | null,
    settings: ISettingRegistry | null
  ) => {
    // Registered here, not as a mime extension, because applying needs the notebook tracker.
    // Notebooks clone this registry when they open, after plugins have activated.
    rendermime.addFactory(changeRendererFactory(tracker));

    // Every page with this extension answers the kernel's meter comm (no "Exception opening new
    // comm"); one without a status bar (Notebook 7) closes it, so the kernel stops sending.
    const meter = new MeterWidget(
      tracker,
      statusBar !== null,
      labShell ? () => void app.commands.execute(OPEN_SIDEBAR) : undefined
    );
    if (settings) {
      const apply = (s: ISettingRegistry.ISettings) =>
        meter.setOptions({
          ...DEFAULT_OPTIONS,
          ...(s.composite as unknown as Partial<IMeterOptions>)
        });
      settings
        .load(PLUGIN_ID)
        .then(s => {
          apply(s);
          s.changed.connect(apply);
        })
        .catch(reason => console.warn('jupyter-gpumem: settings not loaded', reason));
    }
    if (statusBar) {
      const activeChanged = new Signal<MeterWidget, void>(meter);
      tracker.currentChanged.connect(() => activeChanged.emit());
      labShell?.currentChanged.connect(() => activeChanged.emit());
      meter.optionsChanged.connect(() => activeChanged.emit());
      statusBar.registerStatusItem('jupyter-gpumem:meter', {
        item: meter,
        align: 'left',
        rank: 10,
        isActive: () =>
          meter.enabled &&
          tracker.currentWidget !== null &&
          (!labShell || labShell.currentWidget === tracker.currentWidget),
        activeStateChanged: activeChanged
      });
    }

    app.commands.addCommand(OPEN_SIDEBAR, {
      label: 'GPU memory sidebar',
      caption: "Show this notebook's GPU memory gauge in the right sidebar",
      isEnabled: () => !!tracker.currentWidget?.sessionContext.session?.kernel,
      // sidecar's sidebar is JupyterLab's; elsewhere (Notebook 7) the silent run would show nothing
      isVisible: () => labShell !== null,
      execute: async () => {
        const kernel = tracker.currentWidget?.sessionContext.session?.kernel;
        if (!kernel) {
          return;
        }
        const future = kernel.requestExecute({
          code: OPEN_SIDEBAR_CODE,
          silent: true,
          store_history: false
        });
        const reply = await future.done;
        if (reply.content.status !== 'ok') {
          console.error('jupyter-gpumem: %gpumem sidebar failed', reply.content);
        }
      }
    });
    palette?.addItem({ command: OPEN_SIDEBAR, category: 'GPU memory' });
    mainMenu?.viewMenu.addGroup([{ command: OPEN_SIDEBAR }], 40);
  }
};

export default plugin;
