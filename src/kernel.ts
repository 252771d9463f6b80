/**
 * Talk to a notebook's kernel for the panel's connect/disconnect and the command's `%load_ext`.
 * The connection belongs to the kernel (it holds the Dask client), so these run there, not on the
 * Jupyter server, and the panel shows the kernel's own messages.
 */

import type { Kernel, KernelMessage } from '@jupyterlab/services';

export interface IExecution {
  ok: boolean;
  /** stdout + stderr the code printed. */
  text: string;
  /** "Type: message" of the error, when it failed. */
  error: string | null;
}

/** The extension is loaded by every helper first: loading it twice is a no-op. */
export const LOAD_EXT = '%load_ext depin_jupyter';

/** Run ``code`` outside any cell (no history), collecting what it prints and its error. */
export async function execute(
  kernel: Kernel.IKernelConnection,
  code: string,
  silent = false
): Promise<IExecution> {
  const future = kernel.requestExecute({
    code,
    silent,
    store_history: false,
    allow_stdin: false,
    // A failed `%load_ext` must not abort the cell queued after it: the cell then shows the
    // kernel's own error (e.g. "Cell magic `%%depin` not found").
    stop_on_error: false
  });
  const parts: string[] = [];
  future.onIOPub = (msg: KernelMessage.IIOPubMessage) => {
    if (msg.header.msg_type === 'stream') {
      parts.push((msg.content as KernelMessage.IStreamMsg['content']).text);
    }
  };
  const reply = await future.done;
  const content = reply.content as KernelMessage.IExecuteReplyMsg['content'];
  if (content.status === 'error') {
    const evalue = stripAnsi(content.evalue);
    return { ok: false, text: parts.join(''), error: `${content.ename}: ${evalue}` };
  }
  if (content.status === 'aborted') {
    return { ok: false, text: parts.join(''), error: 'the kernel aborted the request' };
  }
  return { ok: true, text: parts.join(''), error: null };
}

function stripAnsi(s: string): string {
  // eslint-disable-next-line no-control-regex
  return s.replace(/\u001b\[[0-9;]*m/g, '');
}
