/**
 * The status-bar GPU memory meter: "GPU 3.1/16.0 GiB" for the current notebook's kernel.
 *
 * The kernel (jupyter_gpumem/meter.py) opens a comm with target `jupyter_gpumem.meter` and sends
 * a sample about once a second. Samples are read from the kernel's iopub stream, so a page opened
 * after the comm was (a reload, a second tab) picks them up too.
 */
import { ISessionContext } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { Widget } from '@lumino/widgets';

export const COMM_TARGET = 'jupyter_gpumem.meter';
const MARKER = 'jupyter_gpumem';
const GiB = 1024 ** 3;

export interface ISample {
  meter: string;
  device_index?: number;
  device_name?: string | null;
  simulated?: boolean;
  used_bytes?: number | null;
  total_bytes?: number | null;
  allocated_bytes?: number | null;
  reserved_bytes?: number | null;
  error?: string | null;
}

function gib(bytes: number | null | undefined): string {
  return bytes === null || bytes === undefined ? '?' : (bytes / GiB).toFixed(1);
}

/** The meter's text and tooltip for one sample (or none yet). */
export function describe(s: ISample | undefined): { text: string; title: string; level: string } {
  if (!s) {
    return {
      text: 'GPU –',
      title:
        'GPU memory: no reading from this kernel yet. Run %load_ext jupyter_gpumem in the notebook.',
      level: 'none'
    };
  }
  if (s.error || s.used_bytes === null || s.used_bytes === undefined) {
    return { text: 'GPU –', title: `GPU memory: ${s.error ?? 'no reading'}`, level: 'none' };
  }
  const total = s.total_bytes ?? null;
  const frac = total ? s.used_bytes / total : 0;
  const name = s.device_name ?? `GPU ${s.device_index ?? 0}`;
  const lines = [
    `${name}${s.simulated ? ' (simulated)' : ''}`,
    `used on the device: ${gib(s.used_bytes)} of ${gib(total)} GiB` +
      (total ? ` (${Math.round(frac * 100)}%)` : ''),
    `PyTorch allocated: ${gib(s.allocated_bytes)} GiB, reserved: ${gib(s.reserved_bytes)} GiB`
  ];
  return {
    text: total ? `GPU ${gib(s.used_bytes)}/${gib(total)} GiB` : `GPU ${gib(s.used_bytes)} GiB`,
    title: lines.join('\n'),
    level: frac >= 0.9 ? 'high' : frac >= 0.7 ? 'mid' : 'low'
  };
}

/** The status-bar item. `samples` holds the last sample of each kernel, by kernel id. */
export class MeterWidget extends Widget {
  readonly samples = new Map<string, ISample>();
  private _watched = new WeakSet<Kernel.IKernelConnection>();

  constructor(private _tracker: INotebookTracker) {
    super();
    this.addClass('jp-gpumem-meter');
    this.node.setAttribute('role', 'status');
    _tracker.widgetAdded.connect((_, panel) => this._watch(panel));
    _tracker.forEach(panel => this._watch(panel));
    _tracker.currentChanged.connect(() => this.refresh());
    this.refresh();
  }

  refresh(): void {
    const kernel = this._tracker.currentWidget?.sessionContext.session?.kernel;
    const d = describe(kernel ? this.samples.get(kernel.id) : undefined);
    this.node.textContent = d.text;
    this.node.title = d.title;
    this.node.dataset.level = d.level;
  }

  private _watch(panel: NotebookPanel): void {
    const ctx: ISessionContext = panel.sessionContext;
    const attach = () => {
      const kernel = ctx.session?.kernel;
      if (kernel && !this._watched.has(kernel)) {
        this._watched.add(kernel);
        // Registered so the comm stays open; the samples themselves are read from iopub.
        kernel.registerCommTarget(COMM_TARGET, () => undefined);
        kernel.iopubMessage.connect(this._onIOPub, this);
        kernel.statusChanged.connect((k, status) => {
          if (status === 'restarting' || status === 'autorestarting' || status === 'dead') {
            this.samples.delete(k.id); // the new process has no meter until it starts one
            this.refresh();
          }
        });
      }
      this.refresh();
    };
    ctx.kernelChanged.connect(attach);
    ctx.ready.then(attach).catch(() => undefined);
    attach();
  }

  private _onIOPub(kernel: Kernel.IKernelConnection, msg: KernelMessage.IIOPubMessage): void {
    const type = msg.header.msg_type;
    if (type !== 'comm_msg' && type !== 'comm_open') {
      return;
    }
    const data = (msg.content as any).data as ISample | undefined;
    if (!data || data.meter !== MARKER || type === 'comm_open') {
      return;
    }
    this.samples.set(kernel.id, data);
    const current = this._tracker.currentWidget?.sessionContext.session?.kernel;
    if (current && current.id === kernel.id) {
      this.refresh();
    }
  }
}
