/**
 * The status-bar GPU memory meter: "GPU 3.1/16.0 GiB" for the current notebook's kernel; with
 * several GPUs every one, "GPU0 3.1/16.0 · GPU1 0.2/16.0 GiB", the last OOM's device marked "⚠".
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
const MiB = 1024 ** 2;
export const OOM_MARK = '⚠';

/** One GPU's reading, as the sample's `devices` lists every visible one. */
export interface IDevice {
  device_index: number;
  used_bytes?: number | null;
  total_bytes?: number | null;
  allocated_bytes?: number | null;
  reserved_bytes?: number | null;
  title?: string | null;
  simulated?: boolean;
}

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
function describeAll(s: ISample, devices: IDevice[]): IDescription {
  const inGiB = devices.some(d => (d.total_bytes ?? d.used_bytes ?? 0) >= GiB);
  const unit = inGiB ? 'GiB' : 'MiB';
  const num = (b: number | null | undefined) =>
    b === null || b === undefined ? '?' : inGiB ? (b / GiB).toFixed(1) : (b / MiB).toFixed(0);
  const oom = s.oom_device ?? null;
  const parts: IPart[] = [];
  const lines = [`${devices.length} GPUs${s.simulated ? ' (simulated)' : ''}`];
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
      title + current +
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
export function describe(s: ISample | undefined): IDescription {
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
    return describeAll(s, s.devices);
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
    level: level(frac)
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
        span.style.color = alarm
          ? 'var(--jp-error-color1)'
          : p.level === 'mid'
            ? 'var(--jp-warn-color1)'
            : '';
        span.style.fontWeight = alarm ? 'bold' : '';
        this.node.append(...(i ? [' · ', span] : [span]));
      });
      this.node.append(` ${d.unit}`);
      this.node.dataset.devices = String(d.parts.length);
      this.node.style.color = 'inherit';
      this.node.style.fontWeight = 'normal';
    } else {
      this.node.textContent = d.text;
      delete this.node.dataset.devices;
      this.node.style.color = '';
      this.node.style.fontWeight = '';
    }
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
