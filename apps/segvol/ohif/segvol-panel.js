/*
 * SegVol Label's OHIF extension: the "SegVol" panel (a right-panel tab of the MONAI Label mode, see segvol-mode.js).
 *   - prompts no OHIF plugin offers: free text with autocomplete from the served vocabulary (/info labels; a name
 *     outside it is sent as free text and marked so), a 3D box (rectangles drawn with the Box tool on one or two
 *     slices; their extent in voxel indices is the box) and positive / negative points, all in one request to
 *     POST /infer/segvol; the latency the server reports is shown;
 *   - lassos (a closed contour on one slice: its box and points inside it) and scribbles (points along the stroke),
 *     positive or negative;
 *   - the segments in the labelmap, each with the prompts that produced it, a lock (no result changes a locked
 *     segment), Refine (the next run refines it: the prompts that made it are kept, a hand-drawn one gives its box and
 *     interior points) and Undo / Redo of its SegVol results;
 *   - the overwrite rule (replace other unlocked segments' voxels, or fill only empty voxels), other segments as
 *     background (negative points in them), and Live mode (each prompt placed runs SegVol at once, clicks made while
 *     it runs are run right after);
 *   - "Save to SegVol Label": PUT /datastore/label with the labelmap and the segment names (label_info); the answer
 *     (or the error) is shown, the labelmap stays in the viewer either way;
 *   - "Next sample": the next image of the server's active-learning strategy, opened in the viewer;
 *   - the model status: the checkpoint that answers (fine-tuned or base, fallback, load error), training progress
 *     (MONAI Label's train task is read every second; while one is requested or running, /info every 0.5 s:
 *     STARTING, RUNNING with its epochs, then its final status), the last validation Dice, the retrain counter.
 * Its buttons run the extension's commands (segvol-extension.js), as the mode's hotkeys do. It renders plain DOM into
 * the host element the extension gives it.
 */

import { ACTIVE_TASK, ACTIVE_TRAIN, ResultHistory, diffLabels, maskPrompts, mergeResult, negativeEvidence,
  restrictDiff, seconds, suggestions, trainingStatus, vocabularyOf } from './segvol-core.js';
import { BOX_TOOL, LASSO_NEGATIVE, LASSO_POSITIVE, NEGATIVE_TOOL, POSITIVE_TOOL, SCRIBBLE_NEGATIVE,
  SCRIBBLE_POSITIVE } from './segvol-viewer.js';

export const COMMANDS_CONTEXT = 'SEGVOL';
const SEG_DESCRIPTION = 'SegVol Label'; // SeriesDescription of the DICOM SEG the server stores (label_info model_name)
const TICK_MS = 500;
const TASK_POLL_MS = 1000;
const INFO_POLL_MS = 15000;

const STYLE = `
.segvol-panel { color: #dfe6f0; font-size: 13px; padding: 8px; display: flex; flex-direction: column; gap: 10px;
  overflow-y: auto; height: 100%; box-sizing: border-box; }
.segvol-panel > * { flex-shrink: 0; }
.segvol-panel h3 { font-size: 13px; font-weight: 600; color: #5acce6; margin: 0 0 4px 0; }
.segvol-panel section { border: 1px solid #3a3f52; border-radius: 6px; padding: 8px; background: #0b1a2a; }
.segvol-panel button { background: #173b5a; color: #fff; border: 1px solid #2f6690; border-radius: 4px; padding: 3px 8px;
  margin: 2px 4px 2px 0; cursor: pointer; font-size: 12px; }
.segvol-panel button:disabled { opacity: .5; cursor: default; }
.segvol-panel button.segvol-primary { background: #2d7bd0; border-color: #5aa0f0; font-weight: 600; }
.segvol-panel button.segvol-active { outline: 2px solid #f0c040; }
.segvol-panel select { background: #000; color: #fff; border: 1px solid #3a3f52; border-radius: 4px; padding: 2px 4px;
  margin: 2px 4px 2px 0; font-size: 12px; }
.segvol-panel input[type=text] { width: 100%; box-sizing: border-box; background: #000; color: #fff; border: 1px solid #3a3f52;
  border-radius: 4px; padding: 4px 6px; }
.segvol-chip { display: inline-block; border-radius: 10px; padding: 1px 8px; margin: 2px; background: #24466b; }
.segvol-chip.segvol-free { background: #6b4a24; font-style: italic; }
.segvol-chip button { margin: 0 0 0 4px; padding: 0 4px; border: 0; background: transparent; }
.segvol-suggest { border: 1px solid #3a3f52; border-top: 0; max-height: 160px; overflow-y: auto; }
.segvol-suggest div { padding: 2px 6px; cursor: pointer; }
.segvol-suggest div:hover { background: #24466b; }
.segvol-message { border-radius: 4px; padding: 6px; white-space: pre-wrap; }
.segvol-message.info { background: #173b5a; } .segvol-message.success { background: #1e5a2e; }
.segvol-message.error { background: #7a1f1f; }
.segvol-muted { color: #8b95a8; font-size: 12px; }
.segvol-table { width: 100%; border-collapse: collapse; font-size: 12px; }
.segvol-table td { padding: 2px 4px; border-top: 1px solid #233; vertical-align: top; }
`;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'style') Object.assign(node.style, value);
    else if (key.startsWith('on')) node.addEventListener(key.slice(2).toLowerCase(), value);
    else if (key === 'text') node.textContent = value;
    else node.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.appendChild(typeof child === 'string' ? document.createTextNode(child) : child);
  }
  return node;
}

function boxText(prompts) {
  const box = prompts.box;
  if (!box) return 'No box.';
  const depth = prompts.rectangles === 1 ? ': draw one on another slice for depth' : 's';
  return `Box i ${box[0]}–${box[3]}, j ${box[1]}–${box[4]}, k ${box[2]}–${box[5]} (${prompts.rectangles} rectangle${depth})`;
}

function pointsText(prompts) {
  return `Points: ${prompts.positive.length} positive, ${prompts.negative.length} negative`;
}

export class SegVolPanel {
  /** `viewer`: a SegVolViewer; `api`: a SegVolApi; `commands`: OHIF's commands manager (the buttons run commands). */
  constructor({ viewer, api, commands }) {
    this.viewer = viewer;
    this.api = api;
    this.commands = commands;
    this.info = null;
    this.infoError = null;
    this.vocabulary = [];
    this.texts = []; // [{name, known}]
    this.running = false;
    this.saving = false;
    this.message = null; // {kind: 'info'|'success'|'error', text, t}
    this.lastRun = null;
    this.lastSave = null;
    this.produced = {}; // segment name -> {prompts, latency, provenance}
    this.dirty = false;
    this.retrain = null; // the last save's retrain answer
    this.retrainAt = 0;
    this.infoAt = 0;
    this.infoTriedAt = 0;
    this.trainTask = null; // MONAI Label's last train task {id, status}
    this.taskAt = 0;
    this.sawRunning = false; // the current task's stats were seen RUNNING (a final status after it is this run's)
    this.polling = false;
    this.typed = '';
    this.activeTool = null;
    this.root = null;
    this.timer = null;
    this.locked = new Set(); // segment names no result may change
    this.rule = 'empty'; // 'replace': a result overwrites other unlocked segments; 'empty': it fills empty voxels only
    this.othersNegative = false; // other segments inside the box become negative points
    this.live = false; // each prompt placed runs SegVol
    this.pendingLive = false; // a prompt was placed while a run was going: run again after it
    this.liveTimes = []; // round trips of live runs (seconds)
    this.refineTarget = null; // the segment the next runs refine
    this.history = new ResultHistory();
  }

  run(command) {
    return this.commands.runCommand(command, {}, COMMANDS_CONTEXT);
  }

  setMessage(kind, text) {
    this.message = { kind, text, t: Date.now() };
    this.render();
  }

  /* ------------------------------------------------------------------------------------------------- life cycle */

  mount(node) {
    if (!node) return this.unmount();
    this.root = node;
    node.className = 'segvol-panel';
    this.render();
    this.loadInfo();
    try {
      this.viewer.listen({
        onPrompts: () => this.refreshPromptInfo(),
        onCompleted: () => { if (this.live) this.run('segvolRun'); },
        onEdit: () => { this.dirty = true; },
        onLabels: () => this.refreshSegments(),
      });
    } catch (e) {
      console.warn('SegVol: no viewer events', e);
    }
    if (!this.timer) this.timer = setInterval(() => this.tick(), TICK_MS);
  }

  unmount() {
    this.root = null;
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    this.viewer.close();
  }

  // MONAI Label's train task every second; /info every 15 s, and every 0.5 s while a run is requested or going (a
  // short run on a small dataset is RUNNING for about 2 s, which a slower poll misses).
  async tick() {
    if (this.running || this.saving || this.polling) return;
    this.polling = true;
    try {
      const now = Date.now();
      const wasActive = this.taskActive();
      if (now - this.taskAt >= TASK_POLL_MS) await this.loadTrainTask();
      const ended = wasActive && !this.taskActive();
      if (ended || this.trainingActive() || Date.now() - this.infoTriedAt >= INFO_POLL_MS) await this.loadInfo();
    } finally {
      this.polling = false;
    }
  }

  taskActive() {
    return Boolean(this.trainTask && ACTIVE_TASK.includes(this.trainTask.status));
  }

  trainingActive() {
    if (this.taskActive()) return true;
    const stats = (this.info && this.info.train_stats) || {};
    return Object.values(stats).some(s => s && (s.status === 'RUNNING'
      || (s.task && ACTIVE_TASK.includes(s.task.status))));
  }

  async loadTrainTask() {
    this.taskAt = Date.now();
    try {
      const task = await this.api.lastTrainTask();
      if (task && (!this.trainTask || task.id !== this.trainTask.id)) this.sawRunning = false; // a new run
      this.trainTask = task;
    } catch (e) { /* the next poll tries again */ }
  }

  async loadInfo() {
    this.infoTriedAt = Date.now();
    try {
      this.info = await this.api.info();
      this.infoAt = Date.now();
      this.infoError = null;
      this.vocabulary = vocabularyOf(this.info);
    } catch (error) {
      this.infoError = String(error.message || error);
    }
    const section = this.root && this.root.querySelector('[data-segvol="status"]');
    if (section) {
      try { section.replaceWith(this.modelStatusSection()); } catch (e) { console.warn('SegVol panel', e); }
    } else {
      this.render();
    }
  }

  /* --------------------------------------------------------------------------------------- what commands run */

  addText(raw) {
    const typed = String(raw || '').trim();
    if (!typed) return;
    const known = this.vocabulary.find(n => n.toLowerCase() === typed.toLowerCase());
    const name = known || typed;
    if (!this.texts.some(t => t.name === name)) this.texts.push({ name, known: Boolean(known) });
    this.render();
  }

  activateTool(toolName) {
    this.viewer.activateTool(toolName);
    this.activeTool = toolName;
    this.render();
  }

  clearPrompts(toolNames) {
    this.viewer.removeAnnotations(toolNames);
    this.render();
  }

  toggleLive() {
    this.live = !this.live;
    this.setMessage('info', this.live ? 'Live: each prompt you place runs SegVol.' : 'Live mode off.');
  }

  setLocked(name, locked) {
    if (locked) this.locked.add(name);
    else this.locked.delete(name);
    this.render();
  }

  /** The next runs refine `name` (again: stop refining). */
  refine(name) {
    this.refineTarget = this.refineTarget === name ? null : name;
    this.setMessage('info', this.refineTarget ? `Refining ${name}: add clicks, the prompts that made it are kept.`
      : 'Refining off: runs segment the names and prompts of the panel.');
  }

  undo(name) { this.step(name, true); }

  redo(name) { this.step(name, false); }

  step(name, undo) {
    const labels = this.viewer.labels();
    const next = labels && (undo ? this.history.undo(name, labels) : this.history.redo(name, labels));
    if (!next) return this.setMessage('error', `Nothing to ${undo ? 'undo' : 'redo'} for ${name}.`);
    this.viewer.setLabels(next);
    const count = this.viewer.presentSegments()[this.viewer.segmentIndexOf(name)] || 0;
    this.setMessage('success', `${undo ? 'Undone' : 'Redone'}: ${name} has ${count} voxels.`);
  }

  // The request's prompts: the panel's names and the viewer's annotations, or, when refining a segment, the prompts
  // that made it (a hand-drawn one: its box and interior points) plus the new annotations.
  requestPrompts() {
    const drawn = this.viewer.collectPrompts();
    const target = this.refineTarget;
    if (!target) {
      return { texts: this.texts.map(t => t.name), free: this.texts.some(t => !t.known), box: drawn.box,
        positive: drawn.positive, negative: drawn.negative };
    }
    const produced = this.produced[target];
    if (produced && produced.provenance && produced.provenance.prompts) {
      const kept = produced.provenance.prompts; // the request's; its texts may name other segments too
      return { texts: produced.texts || [], free: produced.free, box: drawn.box || kept.box || null,
        positive: [...(kept.positive_points || []), ...drawn.positive],
        negative: [...(kept.negative_points || []), ...drawn.negative] };
    }
    const labels = this.viewer.labels();
    const mask = labels && maskPrompts(labels, this.viewer.dimensions(), this.viewer.segmentIndexOf(target));
    if (!mask) throw new Error(`${target} has no voxels to refine`);
    return { texts: [], free: false, box: drawn.box || mask.box, positive: [...mask.positive, ...drawn.positive],
      negative: drawn.negative };
  }

  async segment() {
    if (this.running) {
      if (this.live) this.pendingLive = true; // the click is not lost: it runs when this run is done
      return;
    }
    const displaySet = this.viewer.activeDisplaySet();
    if (!displaySet) return this.setMessage('error', 'No image series in the active viewport.');
    let prompts;
    try {
      prompts = this.requestPrompts();
    } catch (error) {
      return this.setMessage('error', String(error.message || error));
    }
    const { texts, box } = prompts;
    if (!texts.length && !box && !prompts.positive.length) {
      return this.setMessage('error', 'Give SegVol a prompt: a name, a box or a positive point.');
    }
    const target = this.refineTarget;
    const negative = [...prompts.negative];
    const labelsNow = this.viewer.labels();
    if (this.othersNegative && labelsNow) {
      const targets = new Set(target ? [target] : texts);
      const segments = this.viewer.segments();
      const others = Object.keys(this.viewer.presentSegments()).map(Number)
        .filter(index => !targets.has((segments[index] || {}).label));
      negative.push(...negativeEvidence(labelsNow, this.viewer.dimensions(), others, box));
    }
    const params = { result_extension: '.nrrd', result_dtype: 'uint8', result_compress: false,
      restore_label_idx: false };
    if (texts.length) params.texts = texts;
    if (prompts.free) params.free_text = true;
    if (box) params.box = box;
    const points = [...prompts.positive, ...negative];
    if (points.length) {
      params.points = points;
      params.point_labels = [...prompts.positive.map(() => 1), ...negative.map(() => 0)];
    }
    this.running = true;
    this.setMessage('info', 'SegVol is running…');
    const started = performance.now();
    try {
      const { meta, labels } = await this.api.segment(displaySet.SeriesInstanceUID, params);
      if (!this.info) await this.loadInfo();
      await this.viewer.ensureSegmentation(this.vocabulary);
      const current = this.viewer.labels();
      if (!current) throw new Error('no labelmap to put the result in');
      const names = meta.label_names || {};
      const valueToSegment = {};
      const segmentOf = {}; // segment name -> index
      for (const [name, value] of Object.entries(names)) {
        const segmentName = target || name; // a refined segment takes every value of the result
        segmentOf[segmentName] = segmentOf[segmentName] || this.viewer.ensureSegment(segmentName);
        valueToSegment[value] = segmentOf[segmentName];
      }
      const locked = [...this.locked].map(name => this.viewer.segmentIndexOf(name)).filter(Boolean);
      const { labels: merged, counts } = mergeResult(current, labels, valueToSegment, { locked, rule: this.rule });
      const diff = diffLabels(current, merged);
      for (const [name, index] of Object.entries(segmentOf)) {
        const step = restrictDiff(diff, index);
        if (step.indices.length) this.history.record(name, step); // a locked segment's result changed nothing
      }
      this.viewer.setLabels(merged);
      const latency = meta.latencies || {};
      const roundTrip = (performance.now() - started) / 1000;
      if (this.live) this.liveTimes.push(roundTrip);
      const used = meta.prompts || {};
      for (const [name, index] of Object.entries(segmentOf)) {
        this.produced[name] = {
          texts: target ? texts : texts.filter(t => t === name || names[t] === undefined),
          free: target ? prompts.free : this.texts.some(t => t.name === name && !t.known),
          box: used.box || null, positive: (used.positive_points || []).length,
          negative: (used.negative_points || []).length, server_s: latency.total, voxels: counts[index] || 0,
          // what the saved DICOM SEG records for this segment (lib/seg_metadata.py): checkpoint, zoom mode, prompts
          provenance: { model: meta.model, mode: meta.mode, prompts: used },
        };
      }
      this.lastRun = { names: Object.keys(segmentOf), server_s: latency.total, round_trip_s: roundTrip, counts,
        prompts: used, encode_cached: ((meta.stats || {}).embedding_cache_hits || 0) > 0 };
      const found = Object.entries(segmentOf).map(([name, index]) => `${name} (${counts[index] || 0} voxels)`);
      const skipped = Object.keys(segmentOf).filter(name => this.locked.has(name));
      this.setMessage('success', `SegVol: ${found.join(', ') || 'nothing'}${skipped.length ? ` (locked, unchanged: `
        + `${skipped.join(', ')})` : ''} — server ${seconds(latency.total)}, round trip ${seconds(roundTrip)}`);
    } catch (error) {
      this.setMessage('error', String(error.message || error));
    } finally {
      this.running = false;
      this.render();
      if (this.pendingLive) {
        this.pendingLive = false;
        this.run('segvolRun');
      }
    }
  }

  async save() {
    if (this.saving) return;
    const displaySet = this.viewer.activeDisplaySet();
    const voxels = this.viewer.labels();
    if (!displaySet || !voxels) return this.setMessage('error', 'Nothing to save: no labelmap on this series yet.');
    const present = this.viewer.presentSegments();
    const indices = Object.keys(present).map(Number).sort((a, b) => a - b);
    if (!indices.length) return this.setMessage('error', 'Nothing to save: the labelmap is empty.');
    const all = this.viewer.segments();
    const labelInfo = indices.map(idx => {
      const entry = { name: (all[idx] || {}).label || `segment ${idx}`, idx, model_name: SEG_DESCRIPTION };
      const produced = this.produced[entry.name];
      if (produced && produced.provenance && produced.provenance.model) entry.provenance = produced.provenance;
      const color = this.viewer.segmentColor(idx);
      if (color) entry.color = color;
      return entry;
    });
    const bytes = voxels instanceof Uint8Array ? new Uint8Array(voxels) : Uint8Array.from(voxels);
    this.saving = true;
    this.setMessage('info', 'Saving to SegVol Label…');
    try {
      const body = await this.api.saveLabel(displaySet.SeriesInstanceUID, bytes, labelInfo);
      this.retrain = body.retrain || this.retrain;
      this.retrainAt = Date.now();
      this.lastSave = { names: labelInfo.map(l => l.name), image: body.image, at: new Date().toLocaleTimeString(),
        retrain: body.retrain || null };
      this.dirty = false;
      const counter = body.retrain && body.retrain.threshold
        ? ` Retrain counter ${body.retrain.count}/${body.retrain.threshold}.` : '';
      this.setMessage('success', `Saved ${labelInfo.length} segment(s): ${labelInfo.map(l => l.name).join(', ')}.`
        + counter);
      this.loadInfo();
    } catch (error) {
      this.setMessage('error', String(error.message || error));
    } finally {
      this.saving = false;
      this.render();
    }
  }

  async nextSample() {
    if (this.dirty && !window.confirm('The labelmap has changes that are not saved. Open the next sample anyway?')) {
      return;
    }
    const strategies = Object.keys((this.info && this.info.strategies) || {});
    const strategy = strategies.includes('random') ? 'random' : strategies[0] || 'random';
    this.setMessage('info', `Asking for the next sample (${strategy})…`);
    try {
      const sample = await this.api.nextSample(strategy);
      if (!sample.StudyInstanceUID) throw new Error(`the server named no study for ${sample.id || 'the next sample'}`);
      this.setMessage('success', `Opening the next sample: ${sample.id}`);
      const target = new URL(window.location.href);
      target.searchParams.set('StudyInstanceUIDs', sample.StudyInstanceUID);
      window.location.assign(target.toString());
    } catch (error) {
      this.setMessage('error', String(error.message || error));
    }
  }

  /* ------------------------------------------------------------------------------------------------ rendering */

  modelStatusSection() {
    const info = this.info;
    const rows = [];
    if (this.infoError) {
      rows.push(el('div', { class: 'segvol-message error', text: `Server not reachable: ${this.infoError}` }));
    }
    if (info) {
      const status = info.model_status || {};
      const serving = status.serving;
      const kind = serving ? serving.kind : status.wanted_kind;
      const kindText = kind === 'finetuned' || kind === 'fine-tuned' ? 'fine-tuned' : kind || 'unknown';
      const checkpoint = serving ? serving.checkpoint : status.wanted;
      rows.push(el('div', { 'data-segvol': 'model' },
        el('b', { text: 'Model: ' }), `${kindText} checkpoint`,
        serving ? '' : ' (loads on the first request)',
        el('div', { class: 'segvol-muted',
          text: checkpoint ? String(checkpoint).split('/').slice(-2).join('/') : 'no weights found' })));
      if (status.fallback) {
        rows.push(el('div', { class: 'segvol-message error',
          text: 'The wanted checkpoint does not load: a fallback answers.' }));
      }
      if (status.error && status.error.error) {
        rows.push(el('div', { class: 'segvol-muted', text: `Last load error: ${String(status.error.error).slice(0, 200)}` }));
      }
      if (status.pending) {
        rows.push(el('div', { class: 'segvol-muted', 'data-segvol': 'pending',
          text: 'A newer checkpoint is published: the next SegVol run loads it.' }));
      }
      for (const [name, s] of Object.entries(info.train_stats || {})) {
        if (!s || typeof s !== 'object') continue;
        const statusText = trainingStatus(s, this.trainTask, this.sawRunning);
        if (statusText === 'RUNNING' && this.taskActive()) this.sawRunning = true;
        const epochs = s.total_epochs && statusText !== 'STARTING' ? `epoch ${s.epoch || 0}/${s.total_epochs}` : '';
        const dice = typeof s.best_metric === 'number' ? `best validation Dice ${s.best_metric.toFixed(3)}`
          : 'no validation Dice yet';
        const took = typeof s.total_time === 'number' && !ACTIVE_TRAIN.includes(statusText) ? seconds(s.total_time) : '';
        rows.push(el('div', { 'data-segvol': 'training', 'data-trainer': name, 'data-status': statusText },
          el('b', { text: 'Training: ' }), [statusText, epochs, dice, took].filter(Boolean).join(' · '),
          statusText === 'STARTING' ? el('div', { class: 'segvol-muted',
            text: 'Run requested: the training process is loading the labels.' }) : null,
          s.reason ? el('div', { class: 'segvol-muted', text: String(s.reason).slice(0, 200) }) : null));
      }
      const ds = info.datastore || {};
      rows.push(el('div', { class: 'segvol-muted', 'data-segvol': 'datastore',
        text: `Labelled ${ds.completed || 0}/${ds.total || 0} images` }));
    }
    // the counter as /info reports it (the server's, so labels other viewers stored into the PACS are in it too); the
    // last save's answer until the next /info
    const fromInfo = info && info.retrain;
    const retrain = fromInfo && this.retrain && this.retrainAt > this.infoAt ? { ...fromInfo, ...this.retrain }
      : fromInfo || this.retrain;
    let retrainText = 'not reported by this server';
    if (retrain && retrain.threshold) {
      retrainText = `${retrain.count}/${retrain.threshold} labels toward the next training run`;
      if (retrain.queued) retrainText += ' (a training run is queued)';
    } else if (retrain) {
      retrainText = 'automatic retraining off (--conf retrain_threshold)';
    }
    let retrainDetail = '';
    if (retrain && typeof retrain.total === 'number') {
      retrainDetail = `${retrain.total} label(s) counted in all`
        + (retrain.external ? `, ${retrain.external} stored into the PACS by other viewers` : '')
        + (retrain.last_queued && retrain.last_queued.ts
          ? ` · last run queued ${new Date(retrain.last_queued.ts * 1000).toLocaleString()}` : '');
    }
    rows.push(el('div', { 'data-segvol': 'retrain' }, el('b', { text: 'Retrain counter: ' }), retrainText,
      retrainDetail ? el('div', { class: 'segvol-muted', 'data-segvol': 'retrain-detail', text: retrainDetail }) : null));
    return el('section', { 'data-segvol': 'status' }, el('h3', { text: 'Model status' }), rows,
      el('button', { onClick: () => this.loadInfo(), title: 'Read /info again' }, 'Refresh'));
  }

  promptSection() {
    const input = el('input', { type: 'text', placeholder: 'Structure name, e.g. liver (Enter adds it)',
      'data-segvol': 'text', autocomplete: 'off', value: this.typed });
    const suggest = el('div', { class: 'segvol-suggest', 'data-segvol': 'suggestions' });
    const fill = () => {
      suggest.innerHTML = '';
      this.typed = input.value;
      const typed = input.value.trim();
      if (!typed) return;
      for (const name of suggestions(this.vocabulary, typed)) {
        suggest.appendChild(el('div', { text: name, 'data-name': name, onMousedown: e => {
          e.preventDefault();
          this.typed = '';
          this.addText(name);
        } }));
      }
      if (!this.vocabulary.some(n => n.toLowerCase() === typed.toLowerCase())) {
        suggest.appendChild(el('div', { class: 'segvol-muted', text: `Enter: send "${typed}" as free text` }));
      }
    };
    input.addEventListener('input', fill);
    input.addEventListener('keydown', e => {
      if (e.key === 'Enter') {
        e.preventDefault();
        const value = input.value;
        this.typed = '';
        this.addText(value);
      }
    });
    setTimeout(fill, 0);
    const chips = this.texts.map(t => el('span', { class: `segvol-chip${t.known ? '' : ' segvol-free'}`,
      'data-text': t.name, title: t.known ? 'in the served vocabulary'
        : 'not in the vocabulary: sent to the model as free text' },
    t.name, t.known ? '' : ' (free text)',
    el('button', { title: 'Remove', onClick: () => { this.texts = this.texts.filter(x => x !== t); this.render(); } },
      '×')));

    const prompts = this.viewer.collectPrompts();
    const toolButton = (label, tool, title) => el('button', {
      class: this.activeTool === tool ? 'segvol-active' : null, title, 'data-tool': tool,
      onClick: () => this.commands.runCommand('segvolActivateTool', { toolName: tool }, COMMANDS_CONTEXT),
    }, label);
    return el('section', { 'data-segvol': 'prompts' }, el('h3', { text: 'SegVol prompts' }),
      el('div', null, input, suggest),
      el('div', { 'data-segvol': 'texts' }, chips.length ? chips
        : el('span', { class: 'segvol-muted', text: 'No name: the box and points alone.' })),
      el('div', null,
        toolButton('Box', BOX_TOOL, 'Draw a rectangle on one slice, then another on a second slice: the box spans both'),
        toolButton('+ Point', POSITIVE_TOOL, 'Click inside the structure'),
        toolButton('− Point', NEGATIVE_TOOL, 'Click where the structure is not')),
      el('div', null,
        toolButton('+ Lasso', LASSO_POSITIVE, 'Draw around the structure on one slice: its box and points inside it'),
        toolButton('− Lasso', LASSO_NEGATIVE, 'Draw around a region that is not the structure: points inside it'),
        toolButton('+ Scribble', SCRIBBLE_POSITIVE, 'Draw a stroke inside the structure: points along it'),
        toolButton('− Scribble', SCRIBBLE_NEGATIVE, 'Draw a stroke where the structure is not')),
      this.optionsRow(),
      this.refineTarget ? el('div', { class: 'segvol-message info', 'data-segvol': 'refining',
        text: `Refining ${this.refineTarget}: its prompts are kept, new ones are added.` }) : null,
      el('div', { class: 'segvol-muted', 'data-segvol': 'box', text: boxText(prompts) }),
      el('div', { class: 'segvol-muted', 'data-segvol': 'points', text: pointsText(prompts) }),
      prompts.lassos || prompts.scribbles ? el('div', { class: 'segvol-muted', 'data-segvol': 'freehand',
        text: `${prompts.lassos} lasso(s), ${prompts.scribbles} scribble(s)` }) : null,
      el('div', null,
        el('button', { onClick: () => this.clearPrompts([BOX_TOOL]) }, 'Clear box'),
        el('button', { onClick: () => this.clearPrompts([POSITIVE_TOOL, NEGATIVE_TOOL]) }, 'Clear points'),
        el('button', { 'data-segvol': 'clear-freehand', onClick: () => this.clearPrompts([LASSO_POSITIVE,
          LASSO_NEGATIVE, SCRIBBLE_POSITIVE, SCRIBBLE_NEGATIVE]) }, 'Clear lassos/scribbles'),
        el('button', { onClick: () => { this.texts = []; this.render(); } }, 'Clear names')),
      el('div', null, el('button', { class: 'segvol-primary', 'data-segvol': 'run', disabled: this.running,
        title: 'Run SegVol (Shift+R)', onClick: () => this.run('segvolRun') }, this.running ? 'Running…' : 'Run SegVol')),
      this.lastRun ? el('div', { class: 'segvol-muted', 'data-segvol': 'latency',
        'data-round-trip': String(this.lastRun.round_trip_s),
        text: `Last run: server ${seconds(this.lastRun.server_s)}, round trip ${seconds(this.lastRun.round_trip_s)}`
          + (this.lastRun.encode_cached ? ' (image encoding reused)' : '')
          + (this.liveTimes.length ? ` · live: ${this.liveTimes.length} run(s)` : '') }) : null);
  }

  optionsRow() {
    const rule = el('select', { 'data-segvol': 'rule', title: 'What a result may overwrite' },
      el('option', { value: 'empty', selected: this.rule === 'empty' }, 'Fill only empty voxels'),
      el('option', { value: 'replace', selected: this.rule === 'replace' }, 'Replace other unlocked segments'));
    rule.addEventListener('change', () => { this.rule = rule.value; });
    const check = (what, checked, label, title, onChange) => {
      const box = el('input', { type: 'checkbox', 'data-segvol': what, checked });
      box.addEventListener('change', () => onChange(box.checked));
      return el('label', { title }, box, ` ${label} `);
    };
    return el('div', { 'data-segvol': 'options' }, rule,
      check('live', this.live, 'Live', 'Run SegVol on each prompt you place (Shift+L)',
        () => this.run('segvolToggleLive')),
      check('others-negative', this.othersNegative, 'Other segments as background',
        'Points in the other segments (inside the box) are sent as negative points', on => { this.othersNegative = on; }));
  }

  segmentsSection() {
    const present = this.viewer.presentSegments();
    const all = this.viewer.segments();
    const rows = Object.keys(present).map(Number).sort((a, b) => a - b).map(index => {
      const name = (all[index] && all[index].label) || `segment ${index}`;
      const produced = this.produced[name];
      const how = produced ? [produced.free ? 'free text' : (produced.texts.length ? 'text' : ''),
        produced.box ? `box [${produced.box.join(', ')}]` : '', produced.positive ? `${produced.positive} +pt` : '',
        produced.negative ? `${produced.negative} −pt` : '', seconds(produced.server_s)].filter(Boolean).join(', ')
        : 'MONAI Label panel / brush';
      const lock = el('input', { type: 'checkbox', 'data-lock': name, checked: this.locked.has(name),
        title: 'Locked: no SegVol result changes this segment' });
      lock.addEventListener('change', () => this.setLocked(name, lock.checked));
      return el('tr', { 'data-segment': name },
        el('td', null, el('button', { 'data-select': name, title: 'Make it the active segment (brush, eraser)', onClick: () => {
          this.viewer.setActiveSegment(index);
          this.setMessage('info', `Active segment: ${name}`);
        } }, name)),
        el('td', { 'data-count': name, text: `${present[index]}` }),
        el('td', { class: 'segvol-muted', text: how }),
        el('td', null, el('label', null, lock, '🔒'),
          el('button', { 'data-refine': name, class: this.refineTarget === name ? 'segvol-active' : null,
            title: 'Refine this segment with new clicks (its prompts are kept)',
            onClick: () => this.commands.runCommand('segvolRefine', { name }, COMMANDS_CONTEXT) }, 'Refine'),
          el('button', { 'data-undo': name, disabled: !this.history.canUndo(name), title: 'Undo its last SegVol result',
            onClick: () => this.commands.runCommand('segvolUndo', { name }, COMMANDS_CONTEXT) }, 'Undo'),
          el('button', { 'data-redo': name, disabled: !this.history.canRedo(name), title: 'Redo',
            onClick: () => this.commands.runCommand('segvolRedo', { name }, COMMANDS_CONTEXT) }, 'Redo')));
    });
    return el('section', { 'data-segvol': 'segments' }, el('h3', { text: 'Segments in the labelmap' }),
      rows.length ? el('table', { class: 'segvol-table' }, el('tbody', null, rows))
        : el('div', { class: 'segvol-muted', text: 'Empty.' }));
  }

  render() {
    try {
      this.renderPanel();
    } catch (error) {
      // never take the viewer down: show what failed in the panel
      console.error('SegVol panel', error);
      if (this.root) this.root.textContent = `SegVol panel error: ${error && error.message}`;
    }
  }

  renderPanel() {
    const root = this.root;
    if (!root) return;
    const keepFocus = document.activeElement && document.activeElement.getAttribute('data-segvol') === 'text';
    root.innerHTML = '';
    root.appendChild(el('style', { text: STYLE }));
    const series = this.viewer.activeDisplaySet();
    root.appendChild(el('div', { class: 'segvol-muted', 'data-segvol': 'series',
      text: series ? `${series.SeriesDescription || 'Series'} · ${series.numImageFrames || '?'} slices`
        : 'No image series open.' }));
    if (this.message) {
      root.appendChild(el('div', { class: `segvol-message ${this.message.kind}`, 'data-segvol': 'message',
        role: 'status', 'data-t': String(this.message.t) }, this.message.text));
    }
    root.appendChild(this.promptSection());
    root.appendChild(this.segmentsSection());
    root.appendChild(el('section', { 'data-segvol': 'actions' }, el('h3', { text: 'Finish this case' }),
      el('button', { class: 'segvol-primary', 'data-segvol': 'save', disabled: this.saving,
        title: 'Save to SegVol Label (Shift+S)', onClick: () => this.run('segvolSave') },
      this.saving ? 'Saving…' : 'Save to SegVol Label'),
      el('button', { 'data-segvol': 'next', title: 'Next sample (Shift+N)', onClick: () => this.run('segvolNextSample') },
        'Next sample'),
      this.lastSave ? el('div', { class: 'segvol-muted', 'data-segvol': 'saved',
        text: `Saved at ${this.lastSave.at}: ${this.lastSave.names.join(', ')}${this.dirty ? ' (changed since)' : ''}` })
        : null));
    root.appendChild(this.modelStatusSection());
    if (keepFocus) {
      const input = root.querySelector('[data-segvol="text"]');
      if (input) {
        input.focus();
        input.setSelectionRange(input.value.length, input.value.length);
      }
    }
  }

  // Only the parts that viewer events change are redrawn (box/points text, the segment table), so a button the
  // annotator is clicking is never replaced under the mouse.
  refreshPromptInfo() {
    if (!this.root) return;
    const prompts = this.viewer.collectPrompts();
    const box = this.root.querySelector('[data-segvol="box"]');
    if (box) box.textContent = boxText(prompts);
    const points = this.root.querySelector('[data-segvol="points"]');
    if (points) points.textContent = pointsText(prompts);
  }

  refreshSegments() {
    const old = this.root && this.root.querySelector('[data-segvol="segments"]');
    if (old) old.replaceWith(this.segmentsSection());
  }
}
