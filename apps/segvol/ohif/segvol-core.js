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
 * `valueToSegment` (result value -> segment index), `locked` (segment indices no result may change) and `rule`:
 *   'replace': the target segments' old voxels are cleared and the result is written over empty voxels and over
 *              other unlocked segments;
 *   'empty':   the target segments' old voxels are cleared and the result fills only voxels that are then empty.
 * A locked segment keeps every voxel: it is never cleared, never overwritten, and a result aimed at it is dropped.
 * -> {labels (a new array), counts (segment index -> voxels written)}.
 */
export function mergeResult(current, result, valueToSegment, { locked = [], rule = 'empty' } = {}) {
  if (current.length !== result.length) {
    throw new Error(`the result has ${result.length} voxels, the labelmap ${current.length}: not the same grid`);
  }
  if (rule !== 'replace' && rule !== 'empty') throw new Error(`unknown overwrite rule ${rule}`);
  const isLocked = new Uint8Array(256);
  for (const index of locked) isLocked[index] = 1;
  const replaced = new Uint8Array(256);
  const lookup = new Uint8Array(256);
  for (const [value, index] of Object.entries(valueToSegment)) {
    if (isLocked[index]) continue;
    lookup[Number(value)] = index;
    replaced[index] = 1;
  }
  const labels = new Uint8Array(current.length);
  labels.set(current);
  for (let i = 0; i < labels.length; i++) if (replaced[labels[i]]) labels[i] = 0;
  const counts = {};
  const overwrite = rule === 'replace';
  for (let i = 0; i < result.length; i++) {
    const index = lookup[result[i]];
    if (!index) continue;
    const here = labels[i];
    if (here === 0 || (overwrite && !isLocked[here])) {
      labels[i] = index;
      counts[index] = (counts[index] || 0) + 1;
    }
  }
  return { labels, counts };
}

/** The voxels that differ between two labelmaps: {indices, before, after} (what undo and redo apply). */
export function diffLabels(before, after) {
  let count = 0;
  for (let i = 0; i < before.length; i++) if (before[i] !== after[i]) count++;
  const diff = { indices: new Uint32Array(count), before: new Uint8Array(count), after: new Uint8Array(count) };
  let n = 0;
  for (let i = 0; i < before.length; i++) {
    if (before[i] !== after[i]) {
      diff.indices[n] = i;
      diff.before[n] = before[i];
      diff.after[n] = after[i];
      n++;
    }
  }
  return diff;
}

/** The part of `diff` that changed segment `index` (voxels it had before or has after). */
export function restrictDiff(diff, index) {
  const keep = [];
  for (let n = 0; n < diff.indices.length; n++) {
    if (diff.before[n] === index || diff.after[n] === index) keep.push(n);
  }
  return { indices: Uint32Array.from(keep, n => diff.indices[n]), before: Uint8Array.from(keep, n => diff.before[n]),
    after: Uint8Array.from(keep, n => diff.after[n]) };
}

/** A new labelmap: `labels` with `diff` undone (`undo` true: back to its before values) or redone. */
export function applyDiff(labels, diff, undo) {
  const out = new Uint8Array(labels.length);
  out.set(labels);
  const values = undo ? diff.before : diff.after;
  for (let n = 0; n < diff.indices.length; n++) out[diff.indices[n]] = values[n];
  return out;
}

/**
 * Undo and redo of SegVol results, per segment: each applied result is one step of its segment (name). Undo of a
 * segment takes back its last step, redo repeats the last step undone; a new result of a segment clears its redo.
 */
export class ResultHistory {
  constructor(limit = 10) {
    this.limit = limit;
    this.done = {}; // name -> [diff, ...]
    this.undone = {};
  }

  record(name, diff) {
    (this.done[name] = this.done[name] || []).push(diff);
    if (this.done[name].length > this.limit) this.done[name].shift();
    this.undone[name] = [];
  }

  canUndo(name) { return Boolean(this.done[name] && this.done[name].length); }

  canRedo(name) { return Boolean(this.undone[name] && this.undone[name].length); }

  /** `labels` with `name`'s last result taken back (null when there is none). */
  undo(name, labels) {
    if (!this.canUndo(name)) return null;
    const diff = this.done[name].pop();
    this.undone[name].push(diff);
    return applyDiff(labels, diff, true);
  }

  redo(name, labels) {
    if (!this.canRedo(name)) return null;
    const diff = this.undone[name].pop();
    this.done[name].push(diff);
    return applyDiff(labels, diff, false);
  }
}

/** Voxel [i, j, k] of flat index `n` in a volume of `dimensions` [ni, nj, nk] (i fastest, as cornerstone stores). */
export function voxelOf(n, dimensions) {
  const [ni, nj] = dimensions;
  return [n % ni, Math.floor(n / ni) % nj, Math.floor(n / (ni * nj))];
}

/** Up to `count` voxels of `indices` (flat, ascending) spread evenly along them, as [i, j, k]. */
export function spreadVoxels(indices, count, dimensions) {
  if (!indices.length || count <= 0) return [];
  const picks = new Set();
  for (let p = 0; p < Math.min(count, indices.length); p++) {
    picks.add(Math.round((p * (indices.length - 1)) / Math.max(1, Math.min(count, indices.length) - 1)));
  }
  return [...picks].sort((a, b) => a - b).map(p => voxelOf(indices[p], dimensions));
}

/**
 * The prompts that stand for an existing segment (hand-drawn, or from the PACS) when it is refined: the box of its
 * voxels and up to `count` positive points inside it (null when the segment is empty).
 */
export function maskPrompts(labels, dimensions, index, count = 3) {
  const inside = [];
  const lo = [Infinity, Infinity, Infinity];
  const hi = [-Infinity, -Infinity, -Infinity];
  for (let n = 0; n < labels.length; n++) {
    if (labels[n] !== index) continue;
    inside.push(n);
    const v = voxelOf(n, dimensions);
    for (let a = 0; a < 3; a++) {
      lo[a] = Math.min(lo[a], v[a]);
      hi[a] = Math.max(hi[a], v[a]);
    }
  }
  if (!inside.length) return null;
  // the points from the segment's middle third (raster order), away from its first and last voxels
  const middle = inside.slice(Math.floor(inside.length / 3), Math.ceil((2 * inside.length) / 3));
  return { box: [...lo, ...hi], positive: spreadVoxels(middle.length ? middle : inside, count, dimensions) };
}

/** Whether 2-D point `p` lies inside `polygon` ([[x, y], ...], closed implicitly): even-odd ray casting. */
export function insidePolygon(p, polygon) {
  let inside = false;
  for (let a = 0, b = polygon.length - 1; a < polygon.length; b = a++) {
    const [xa, ya] = polygon[a];
    const [xb, yb] = polygon[b];
    if ((ya > p[1]) !== (yb > p[1]) && p[0] < ((xb - xa) * (p[1] - ya)) / (yb - ya) + xa) inside = !inside;
  }
  return inside;
}

/**
 * A lasso (a closed contour on one slice, as voxel [i, j, k] points) -> its prompts: a positive lasso gives the box of
 * the contour on that slice and up to `count` positive points inside it; a negative one gives negative points inside
 * it and no box.
 */
export function lassoPrompts(contour, positive, count = 3) {
  if (contour.length < 3) return { box: null, points: [] };
  const k = Math.round(contour.reduce((sum, p) => sum + p[2], 0) / contour.length);
  const polygon = contour.map(p => [p[0], p[1]]);
  const lo = [0, 1].map(a => Math.min(...polygon.map(p => p[a])));
  const hi = [0, 1].map(a => Math.max(...polygon.map(p => p[a])));
  const grid = [];
  const steps = 8;
  for (let y = 0; y <= steps; y++) {
    for (let x = 0; x <= steps; x++) {
      const p = [Math.round(lo[0] + ((hi[0] - lo[0]) * x) / steps), Math.round(lo[1] + ((hi[1] - lo[1]) * y) / steps)];
      if (insidePolygon([p[0] + 0.5, p[1] + 0.5], polygon) || insidePolygon(p, polygon)) grid.push([p[0], p[1], k]);
    }
  }
  const unique = [...new Map(grid.map(p => [p.join(','), p])).values()];
  const points = [];
  for (let n = 0; n < Math.min(count, unique.length); n++) {
    points.push(unique[Math.floor(((n + 0.5) * unique.length) / Math.min(count, unique.length))]);
  }
  return { box: positive ? [lo[0], lo[1], k, hi[0], hi[1], k] : null, points };
}

/** A scribble (a stroke of voxel [i, j, k] points) -> up to `count` distinct points spread along it. */
export function strokePoints(stroke, count = 5) {
  const unique = [...new Map(stroke.map(p => [p.join(','), p])).values()];
  if (unique.length <= count) return unique;
  return Array.from({ length: count }, (_, n) => unique[Math.round((n * (unique.length - 1)) / (count - 1))]);
}

/**
 * Other segments as background evidence: up to `count` negative points in the voxels of the `segments` (indices)
 * that lie inside `box` ([i0, j0, k0, i1, j1, k1]; the whole volume when null).
 */
export function negativeEvidence(labels, dimensions, segments, box, count = 3) {
  const wanted = new Uint8Array(256);
  for (const index of segments) wanted[index] = 1;
  const found = [];
  for (let n = 0; n < labels.length; n++) {
    if (!wanted[labels[n]]) continue;
    if (box) {
      const v = voxelOf(n, dimensions);
      if (v.some((c, a) => c < box[a] || c > box[a + 3])) continue;
    }
    found.push(n);
  }
  return spreadVoxels(found, count, dimensions);
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
