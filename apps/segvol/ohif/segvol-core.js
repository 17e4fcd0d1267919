/*
 * SegVol Label's OHIF extension: the pure functions (no DOM, no viewer, no network), so `node --test` checks them
 * (tests/ohif/segvol-core.test.mjs): reading the server's NRRD result, the box of the drawn rectangles, merging a
 * result into the labelmap, the training status shown, the name suggestions.
 */

export const PALETTE = [
  [221, 84, 64], [79, 166, 92], [64, 120, 221], [230, 180, 50], [170, 90, 200], [60, 190, 190], [240, 130, 40],
  [200, 60, 130], [140, 190, 60], [110, 110, 230],
];

/* MONAI Label's train task states while a run is requested or going (GET /train/), and the panel's own. */
export const ACTIVE_TASK = ['SUBMITTED', 'RUNNING'];
export const ACTIVE_TRAIN = ['RUNNING', 'STARTING'];

export const seconds = s => (typeof s === 'number' ? `${s.toFixed(s < 10 ? 2 : 1)} s` : '?');

/** A stable colour per segment name: [r, g, b, 255]. */
export function colorOf(name) {
  let hash = 0;
  for (const c of name) hash = (hash * 31 + c.charCodeAt(0)) >>> 0;
  return [...PALETTE[hash % PALETTE.length], 255];
}

/**
 * A NRRD file as /infer writes it with result_compress=false (text header, blank line, raw uint8 voxels)
 * -> {sizes, data}. Anything else throws, naming what is wrong.
 */
export function parseNrrd(buffer) {
  const bytes = new Uint8Array(buffer);
  let end = -1;
  for (let i = 0; i + 1 < bytes.length && i < 65536; i++) {
    if (bytes[i] === 10 && bytes[i + 1] === 10) {
      end = i;
      break;
    }
  }
  if (end < 0) throw new Error('the result is not a NRRD file');
  const header = new TextDecoder('latin1').decode(bytes.subarray(0, end));
  const fields = {};
  for (const line of header.split('\n')) {
    const at = line.indexOf(':');
    if (at > 0 && !line.startsWith('#')) {
      fields[line.slice(0, at).trim().toLowerCase()] = line.slice(at + 1).replace(/^=/, '').trim();
    }
  }
  if ((fields.encoding || 'raw') !== 'raw') throw new Error(`NRRD encoding ${fields.encoding} (expected raw)`);
  if (!/uint8|unsigned char|uchar/.test(fields.type || '')) throw new Error(`NRRD type ${fields.type} (expected uint8)`);
  const sizes = (fields.sizes || '').split(/\s+/).map(Number);
  const count = sizes.reduce((a, b) => a * b, 1);
  const data = bytes.subarray(end + 2, end + 2 + count);
  if (data.length !== count) throw new Error(`NRRD holds ${data.length} voxels, its header says ${count}`);
  return { sizes, data };
}

/** World-to-index results rounded and clamped into a volume of `dimensions` [ni, nj, nk]. */
export function clampIndex(ijk, dimensions) {
  return ijk.map((v, a) => Math.min(Math.max(Math.round(v), 0), dimensions[a] - 1));
}

/** The box [i0, j0, k0, i1, j1, k1] (inclusive) spanning voxel `corners`, or null when there are none. */
export function boxOfCorners(corners) {
  if (!corners.length) return null;
  const lo = [0, 1, 2].map(a => Math.min(...corners.map(c => c[a])));
  const hi = [0, 1, 2].map(a => Math.max(...corners.map(c => c[a])));
  return [...lo, ...hi];
}

/**
 * A result merged into the labelmap: `current` (the labelmap's voxels), `result` (the server's values),
 * `valueToSegment` (result value -> segment index). The result's segments are replaced: their old voxels are cleared
 * and the result's voxels written where the labelmap is then empty, so other segments (and brush work) are kept.
 * -> {labels (a new array), counts (segment index -> voxels written)}.
 */
export function mergeResult(current, result, valueToSegment) {
  if (current.length !== result.length) {
    throw new Error(`the result has ${result.length} voxels, the labelmap ${current.length}: not the same grid`);
  }
  const replaced = new Uint8Array(256);
  for (const index of Object.values(valueToSegment)) replaced[index] = 1;
  const lookup = new Uint8Array(256);
  for (const [value, index] of Object.entries(valueToSegment)) lookup[Number(value)] = index;
  const labels = new Uint8Array(current.length);
  labels.set(current);
  for (let i = 0; i < labels.length; i++) if (replaced[labels[i]]) labels[i] = 0;
  const counts = {};
  for (let i = 0; i < result.length; i++) {
    const index = lookup[result[i]];
    if (index && labels[i] === 0) {
      labels[i] = index;
      counts[index] = (counts[index] || 0) + 1;
    }
  }
  return { labels, counts };
}

/** Voxels per non-zero value of a labelmap: {value: count}. */
export function voxelCounts(labels) {
  const counts = new Uint32Array(256);
  for (let i = 0; i < labels.length; i++) counts[labels[i]]++;
  const out = {};
  for (let v = 1; v < 256; v++) if (counts[v]) out[v] = counts[v];
  return out;
}

/** Up to `limit` vocabulary names for what is typed: names starting with it first, then names containing it. */
export function suggestions(vocabulary, typed, limit = 8) {
  const lower = String(typed || '').trim().toLowerCase();
  if (!lower) return [];
  const starts = vocabulary.filter(n => n.toLowerCase().startsWith(lower));
  const contains = vocabulary.filter(n => !n.toLowerCase().startsWith(lower) && n.toLowerCase().includes(lower));
  return [...starts, ...contains].slice(0, limit);
}

/**
 * The status a training run shows: `stats` (a trainer's /info train_stats), `task` (MONAI Label's last train task,
 * {id, status}, or null) and `sawRunning` (this task's stats were seen RUNNING). While the task is requested and its
 * stats still describe the previous run, the run is STARTING.
 */
export function trainingStatus(stats, task, sawRunning) {
  const requested = Boolean(task && ACTIVE_TASK.includes(task.status));
  if (stats.status === 'RUNNING') return 'RUNNING';
  if (requested && !sawRunning) return 'STARTING';
  return stats.status || (stats.task && stats.task.status) || (stats.epoch ? 'DONE' : 'never run');
}

/** The image's vocabulary from /info: the app's labels and the segvol model's, sorted. */
export function vocabularyOf(info) {
  const listed = info.labels || [];
  const names = new Set(Array.isArray(listed) ? listed : Object.keys(listed));
  const model = info.models && info.models.segvol;
  if (model && model.labels) {
    for (const name of Array.isArray(model.labels) ? model.labels : Object.keys(model.labels)) names.add(name);
  }
  return [...names].sort();
}
