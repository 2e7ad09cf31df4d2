/**
 * The status-bar GPU memory meter: "GPU 3.1/16.0 GiB" for the current notebook's kernel ("GPU
 * 34/160 MiB" on a card under 1 GiB, the numbers `%gpumem status` prints); with several GPUs
 * every one, "GPU0 3.1/16.0 · GPU1 0.2/16.0 GiB", the last OOM's device marked "⚠". A click (or
 * Enter) opens the GPU memory sidebar.
 *
 * The kernel (jupyter_gpumem/frontend/meter.py) opens a comm with target
 * `jupyter_gpumem.frontend.meter` and sends a sample about once a second. Samples are read from
 * the kernel's iopub stream, so a page opened after the comm was (a reload, a second tab) picks
 * them up too. A page that shows no meter (Notebook 7 has no status bar; the setting off) closes
 * the comm at once, and the kernel stops sending.
 */
import { ISessionContext } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

export const COMM_TARGET = 'jupyter_gpumem.frontend.meter';
const MARKER = 'jupyter_gpumem';
const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
export const OOM_MARK = '⚠';

/** The front end's options (the Settings Editor's "GPU memory" entry). */
export interface IMeterOptions {
  meter: boolean; // show the status-bar meter
  unit: 'auto' | 'MiB' | 'GiB'; // auto: MiB while no card reaches 1 GiB
  refreshSeconds: number; // how often the kernel sends a reading
}

export const DEFAULT_OPTIONS: IMeterOptions = { meter: true, unit: 'auto', refreshSeconds: 1 };

/** One GPU's reading, as the sample's `devices` lists every visible one. */
export interface IDevice {
  device_index: number;
  used_bytes?: number | null;
  total_bytes?: number | null;
  allocated_bytes?: number | null;
  reserved_bytes?: number | null;
  title?: string | null;
  note?: string | null; // the backend's words after the device's name: "simulated"
}

export interface ISample {
  meter: string;
  device_index?: number;
  device_name?: string | null;
  note?: string | null; // the backend's words after the device's name: "simulated"
  used_bytes?: number | null;
  total_bytes?: number | null;
  allocated_bytes?: number | null;
  reserved_bytes?: number | null;
  error?: string | null;
  devices?: IDevice[];
  oom_device?: number | null; // the device of the kernel's last OOM
}

/** One device's part of the meter's text, for a meter showing several. */
export interface IPart {
  text: string;
  level: string;
  oom: boolean;
}

export interface IDescription {
  text: string;
  title: string;
  level: string;
  parts?: IPart[]; // several GPUs: one per device, then `unit` (text is their join)
  unit?: string;
}

function gib(bytes: number | null | undefined): string {
  return bytes === null || bytes === undefined ? '?' : (bytes / GiB).toFixed(1);
}

function size(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined) {
    return '?';
  }
  return bytes >= GiB
    ? `${(bytes / GiB).toFixed(2)} GiB`
    : bytes >= MiB
      ? `${(bytes / MiB).toFixed(1)} MiB`
      : `${bytes} B`;
}

function level(frac: number): string {
  return frac >= 0.9 ? 'high' : frac >= 0.7 ? 'mid' : 'low';
}

/** Several GPUs: "GPU0 3.1/16.0 · ⚠GPU1 15.9/16.0 GiB" (MiB when no card reaches 1 GiB), the
 * meter's level the fullest device's, a tooltip with each device's numbers. */
function inGiB(unit: IMeterOptions['unit'], sizes: (number | null | undefined)[]): boolean {
  return unit === 'auto' ? sizes.some(b => (b ?? 0) >= GiB) : unit === 'GiB';
}

function describeAll(
  s: ISample,
  devices: IDevice[],
  unitOption: IMeterOptions['unit'] = 'auto'
): IDescription {
  const inGiB_ = inGiB(
    unitOption,
    devices.map(d => d.total_bytes ?? d.used_bytes)
  );
  const unit = inGiB_ ? 'GiB' : 'MiB';
  const num = (b: number | null | undefined) =>
    b === null || b === undefined ? '?' : inGiB_ ? (b / GiB).toFixed(1) : (b / MiB).toFixed(0);
  const oom = s.oom_device ?? null;
  const parts: IPart[] = [];
  const lines = [`${devices.length} GPUs${s.note ? ` (${s.note})` : ''}`];
  let fullest = 0;
  for (const d of devices) {
    const used = d.used_bytes ?? null;
    const total = d.total_bytes ?? null;
    const frac = used !== null && total ? used / total : 0;
    fullest = Math.max(fullest, frac);
    const marked = oom !== null && d.device_index === oom;
    const reading = used === null ? '–' : total ? `${num(used)}/${num(total)}` : num(used);
    parts.push({
      text: `${marked ? OOM_MARK : ''}GPU${d.device_index} ${reading}`,
      level: used === null ? 'none' : level(frac),
      oom: marked
    });
    const name = `GPU ${d.device_index}`;
    const title = !d.title ? name : d.title.includes(name) ? d.title : `${name}: ${d.title}`;
    const current = d.device_index === s.device_index ? ' (current device)' : '';
    lines.push(
      '',
      title +
        current +
        (marked ? `  ${OOM_MARK} the last OOM ran out here` : ''),
      used === null
        ? '  no reading'
        : `  used on the device: ${size(used)} of ${size(total)}` +
            (total ? ` (${Math.round(frac * 100)}%)` : ''),
      `  PyTorch allocated: ${size(d.allocated_bytes)}, reserved: ${size(d.reserved_bytes)}`
    );
  }
  return {
    text: `${parts.map(p => p.text).join(' · ')} ${unit}`,
    title: lines.join('\n'),
    level: level(fullest),
    parts,
    unit
  };
}

/** The meter's text and tooltip for one sample (or none yet). */
export function describe(
  s: ISample | undefined,
  unit: IMeterOptions['unit'] = 'auto'
): IDescription {
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
  if (s.devices && s.devices.length > 1) {
    return describeAll(s, s.devices, unit);
  }
  const total = s.total_bytes ?? null;
  const frac = total ? s.used_bytes / total : 0;
  const name = s.device_name ?? `GPU ${s.device_index ?? 0}`;
  const lines = [
    `${name}${s.note ? ` (${s.note})` : ''}`,
    `used on the device: ${size(s.used_bytes)} of ${size(total)}` +
      (total ? ` (${Math.round(frac * 100)}%)` : ''),
    `PyTorch allocated: ${size(s.allocated_bytes)}, reserved: ${size(s.reserved_bytes)}`,
    'Click to open the GPU memory sidebar.'
  ];
  const big = inGiB(unit, [total ?? s.used_bytes]);
  const num = (b: number | null | undefined) =>
    big ? gib(b) : b === null || b === undefined ? '?' : (b / MiB).toFixed(0);
  const u = big ? 'GiB' : 'MiB';
  return {
    text: total ? `GPU ${num(s.used_bytes)}/${num(total)} ${u}` : `GPU ${num(s.used_bytes)} ${u}`,
    title: lines.join('\n'),
    level: level(frac)
  };
}

/** The status-bar item. `samples` holds the last sample of each kernel, by kernel id. */
export class MeterWidget extends Widget {
  readonly samples = new Map<string, ISample>();
  private _watched = new WeakSet<Kernel.IKernelConnection>();
  private _comms = new Map<string, Kernel.IComm>(); // the open meter comm of each kernel
  private _options: IMeterOptions = { ...DEFAULT_OPTIONS };
  /** Emitted when the options change (the status bar asks `enabled` again). */
  readonly optionsChanged = new Signal<this, void>(this);

  /** Whether the settings want the meter shown (the status bar hides it otherwise). */
  get enabled(): boolean {
    return this._options.meter;
  }

  /**
   * `shown`: whether this page shows the meter (false in a front end without a status bar):
   * the kernel's comm is then closed on arrival, and it stops sending. `open`: what a click does.
   */
  constructor(
    private _tracker: INotebookTracker,
    private _shown: boolean,
    open?: () => void
  ) {
    super();
    this.addClass('jp-gpumem-meter');
    if (open) {
      // a button, not a live region: a reading a second is not something to announce
      this.node.setAttribute('role', 'button');
      this.node.tabIndex = 0;
      this.node.addEventListener('click', () => open());
      this.node.addEventListener('keydown', (e: KeyboardEvent) => {
        if (e.key === 'Enter' || e.key === ' ') {
          e.preventDefault();
          open();
        }
      });
    }
    _tracker.widgetAdded.connect((_, panel) => this._watch(panel));
    _tracker.forEach(panel => this._watch(panel));
    _tracker.currentChanged.connect(() => this.refresh());
    this.refresh();
  }

  /** The Settings Editor's options: shown or not, the unit, the kernel's refresh interval. */
  setOptions(options: IMeterOptions): void {
    const refreshChanged = options.refreshSeconds !== this._options.refreshSeconds;
    this._options = { ...options };
    if (!options.meter) {
      for (const comm of this._comms.values()) {
        comm.close();
      }
      this._comms.clear();
    } else if (refreshChanged) {
      for (const comm of this._comms.values()) {
        this._sendInterval(comm);
      }
    }
    this.refresh();
    this.optionsChanged.emit();
  }

  private _sendInterval(comm: Kernel.IComm): void {
    try {
      comm.send({ interval: this._options.refreshSeconds });
    } catch (e) {
      // a kernel going away: nothing to tell it
    }
  }

  refresh(): void {
    const kernel = this._tracker.currentWidget?.sessionContext.session?.kernel;
    const d = describe(kernel ? this.samples.get(kernel.id) : undefined, this._options.unit);
    if (d.parts) {
      // one span per device, the same text as d.text; each coloured by its own level (the
      // stylesheet's rules colour the whole meter by its level: not with several devices)
      this.node.textContent = '';
      d.parts.forEach((p, i) => {
        const span = document.createElement('span');
        span.className = 'jp-gpumem-device';
        span.textContent = p.text;
        span.dataset.level = p.level;
        span.dataset.oom = String(p.oom);
        const alarm = p.oom || p.level === 'high';
        // colours from the stylesheet (.jp-gpumem-device[data-level]), >= 4.5:1 on both themes
        span.dataset.alarm = String(alarm);
        this.node.append(...(i ? [' · ', span] : [span]));
      });
      this.node.append(` ${d.unit}`);
      this.node.dataset.devices = String(d.parts.length);
    } else {
      this.node.textContent = d.text;
      delete this.node.dataset.devices;
    }
    this.node.setAttribute('aria-label', `${d.text}. ${d.title.split('\n')[0]}`);
    this.node.title = d.title;
    this.node.dataset.level = d.level;
  }

  private _watch(panel: NotebookPanel): void {
    const ctx: ISessionContext = panel.sessionContext;
    const attach = () => {
      const kernel = ctx.session?.kernel;
      if (kernel && !this._watched.has(kernel)) {
        this._watched.add(kernel);
        // Registered so the comm opens without an error in the page; the samples themselves
        // are read from iopub. Not shown here: closed, so the kernel stops sending.
        kernel.registerCommTarget(COMM_TARGET, comm => {
          if (!this._shown || !this._options.meter) {
            comm.close();
            return;
          }
          this._comms.get(kernel.id)?.dispose();
          this._comms.set(kernel.id, comm);
          comm.onClose = () => {
            if (this._comms.get(kernel.id) === comm) {
              this._comms.delete(kernel.id);
            }
          };
          if (this._options.refreshSeconds !== DEFAULT_OPTIONS.refreshSeconds) {
            this._sendInterval(comm);
          }
        });
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
