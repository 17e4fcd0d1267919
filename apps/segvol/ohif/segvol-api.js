/*
 * SegVol Label's OHIF extension: the server's REST API as the panel uses it (the same server that serves OHIF).
 * Every call throws an Error whose message is the server's own `detail` when it refuses.
 */

import { parseNrrd } from './segvol-core.js';

export const CLIENT_ID = 'segvol-ohif';

export class SegVolApi {
  /** `origin`: the server's address (default: the page's). */
  constructor(origin = window.location.origin) {
    this.origin = origin;
  }

  url(path) {
    return new URL(path, `${this.origin}/`);
  }

  async info() {
    const response = await fetch(this.url('info/'), { headers: { accept: 'application/json' } });
    if (!response.ok) throw new Error(`HTTP ${response.status}: ${await readError(response)}`);
    return response.json();
  }

  /** MONAI Label's last train task {id, status}, or null when there is none (HTTP 404). */
  async lastTrainTask() {
    const response = await fetch(this.url('train/'), { headers: { accept: 'application/json' } });
    if (response.status === 404) return null;
    if (!response.ok) throw new Error(`HTTP ${response.status}: ${await readError(response)}`);
    const task = await response.json();
    return task && typeof task === 'object' ? { id: task.id, status: task.status } : null;
  }

  /** POST /infer/segvol for the series `image` -> {meta (the response's params), labels (uint8 voxels)}. */
  async segment(image, params) {
    const url = this.url('infer/segvol');
    url.searchParams.append('image', image);
    url.searchParams.append('output', 'all');
    const form = new FormData();
    form.append('params', JSON.stringify({ ...params, client_id: CLIENT_ID }));
    const response = await fetch(url, { method: 'POST', body: form });
    if (!response.ok) throw new Error(`SegVol failed (HTTP ${response.status}): ${await readError(response)}`);
    const parts = await response.formData();
    const meta = JSON.parse(parts.get('params'));
    const result = parts.get('image');
    if (!result) throw new Error('the server sent no label image');
    return { meta, labels: parseNrrd(await result.arrayBuffer()).data };
  }

  /** PUT /datastore/label: the labelmap's voxels as raw uint8 and its segments' `labelInfo` -> the server's answer. */
  async saveLabel(image, voxels, labelInfo) {
    const url = this.url('datastore/label');
    url.searchParams.append('image', image);
    const form = new FormData();
    form.append('params', JSON.stringify({ label_info: labelInfo, client_id: CLIENT_ID }));
    form.append('label', new Blob([voxels]), 'label.bin');
    const response = await fetch(url, { method: 'PUT', body: form });
    if (!response.ok) {
      throw new Error(`Not saved (HTTP ${response.status}): ${await readError(response)}. The labelmap is still here: `
        + 'save again.');
    }
    return response.json();
  }

  /** POST /activelearning/{strategy} -> the next sample ({id, StudyInstanceUID, ...}). */
  async nextSample(strategy) {
    const response = await fetch(this.url(`activelearning/${encodeURIComponent(strategy)}`), {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: '{}',
    });
    if (!response.ok) throw new Error(`No next sample (HTTP ${response.status}): ${await readError(response)}`);
    return response.json();
  }
}

export async function readError(response) {
  const text = await response.text().catch(() => '');
  try {
    const body = JSON.parse(text);
    if (body && body.detail) return typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail);
  } catch (e) { /* not JSON */ }
  return text.slice(0, 300) || response.statusText;
}
