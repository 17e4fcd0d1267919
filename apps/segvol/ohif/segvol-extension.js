/*
 * SegVol Label's OHIF extension (plain ES module, no build step; served at /ohif/segvol/segvol-extension.js and
 * listed in /ohif/app-config.js). It runs inside the OHIF build shipped with monailabel (3.10.0-beta.5) and uses only
 * what that build exposes at runtime: the services manager, the commands manager, cornerstone and cornerstone tools
 * (from @ohif/extension-cornerstone's utility module).
 *
 * The "SegVol" panel (a right-panel tab of the MONAI Label mode, see segvol-mode.js):
 *   - prompts no OHIF plugin offers: free text with autocomplete from the served vocabulary (/info labels; a name
 *     outside it is sent as free text and marked so), a 3D box (rectangles drawn with the Box tool on one or two
 *     slices; their extent in voxel indices is the box) and positive / negative points, all in one request to
 *     POST /infer/segvol; the latency the server reports is shown;
 *   - the segments in the labelmap, each with the prompts that produced it;
 *   - "Save to SegVol Label": PUT /datastore/label with the labelmap and the segment names (label_info); the answer
 *     (or the error) is shown, the labelmap stays in the viewer either way;
 *   - "Next sample": the next image of the server's active-learning strategy, opened in the viewer;
 *   - the model status: the checkpoint that answers (fine-tuned or base, fallback, load error), training progress (a
 *     run started with the MONAI Label panel's "Update Model" is followed every 0.5 s: STARTING, RUNNING with its
 *     epochs, then its final status) and
 *     the last validation Dice, the retrain counter.
 * The labelmap is OHIF segmentation '1', the one the MONAI Label panel fills, so its tabs (Auto-Segmentation, Class and
 * Point Prompts) and this panel work on the same segments, and OHIF's segmentation panel (brush, eraser) edits them.
 *
 * The panel renders plain DOM: the extension has no React of its own, so the panel component returns one host element
 * (built as React 18 element data) and fills it from a ref callback.
 */

const EXTENSION_ID = '@segvol/extension-segvol';
const SEGMENTATION_ID = '1';
const POSITIVE_TOOL = 'SegVolPositivePoint';
const NEGATIVE_TOOL = 'SegVolNegativePoint';
const BOX_TOOL = 'RectangleROI';
const SEG_DESCRIPTION = 'SegVol Label'; // SeriesDescription of the DICOM SEG the server stores (label_info model_name)
const PALETTE = [
  [221, 84, 64], [79, 166, 92], [64, 120, 221], [230, 180, 50], [170, 90, 200], [60, 190, 190], [240, 130, 40],
  [200, 60, 130], [140, 190, 60], [110, 110, 230],
];

let services = null;
let commands = null;
let extensions = null;
const REACT_ELEMENT = Symbol.for('react.element');

/* ------------------------------------------------------------------------------------------------ small helpers */

function libraries() {
  try {
    const entry = extensions.getModuleEntry('@ohif/extension-cornerstone.utilityModule.common');
    const libs = entry.exports.getCornerstoneLibraries();
    if (libs && libs.cornerstone && libs.cornerstoneTools) return libs;
  } catch (e) { /* fall back to the globals the cornerstone extension sets */ }
  return { cornerstone: window.cornerstone, cornerstoneTools: window.cornerstoneTools };
}

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

const seconds = s => (typeof s === 'number' ? `${s.toFixed(s < 10 ? 2 : 1)} s` : '?');

function colorOf(name) {
  let hash = 0;
  for (const c of name) hash = (hash * 31 + c.charCodeAt(0)) >>> 0;
  return [...PALETTE[hash % PALETTE.length], 255];
}

function serverURL(path) {
  return new URL(path, window.location.origin + '/').toString();
}

async function readError(response) {
  const text = await response.text().catch(() => '');
  try {
    const body = JSON.parse(text);
    if (body && body.detail) return typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail);
  } catch (e) { /* not JSON */ }
  return text.slice(0, 300) || response.statusText;
}

// A NRRD file as /infer writes it with result_compress=false: text header, blank line, raw voxels.
function parseNrrd(buffer) {
  const bytes = new Uint8Array(buffer);
  let end = -1;
  for (let i = 0; i + 1 < bytes.length && i < 65536; i++) {
    if (bytes[i] === 10 && bytes[i + 1] === 10) { end = i; break; }
  }
  if (end < 0) throw new Error('the result is not a NRRD file');
  const header = new TextDecoder('latin1').decode(bytes.subarray(0, end));
  const fields = {};
  for (const line of header.split('\n')) {
    const at = line.indexOf(':');
    if (at > 0 && !line.startsWith('#')) fields[line.slice(0, at).trim().toLowerCase()] = line.slice(at + 1).replace(/^=/, '').trim();
  }
  if ((fields.encoding || 'raw') !== 'raw') throw new Error(`NRRD encoding ${fields.encoding} (expected raw)`);
  if (!/uint8|unsigned char|uchar/.test(fields.type || '')) throw new Error(`NRRD type ${fields.type} (expected uint8)`);
  const sizes = (fields.sizes || '').split(/\s+/).map(Number);
  const count = sizes.reduce((a, b) => a * b, 1);
  const data = bytes.subarray(end + 2, end + 2 + count);
  if (data.length !== count) throw new Error(`NRRD holds ${data.length} voxels, its header says ${count}`);
  return { sizes, data };
}

/* ------------------------------------------------------------------------------------------ viewer state access */

function activeViewportId() {
  return services.viewportGridService.getActiveViewportId();
}

function activeDisplaySet() {
  const { viewportGridService, displaySetService } = services;
  const { viewports, activeViewportId } = viewportGridService.getState();
  const viewport = viewports.get(activeViewportId);
  if (!viewport || !viewport.displaySetInstanceUIDs || !viewport.displaySetInstanceUIDs.length) return null;
  for (const uid of viewport.displaySetInstanceUIDs) {
    const displaySet = displaySetService.getDisplaySetByUID(uid);
    if (displaySet && displaySet.Modality !== 'SEG') return displaySet;
  }
  return null;
}

// The image volume on screen (the CT, not the labelmap) in the active viewport.
function imageVolume() {
  const { cornerstone } = libraries();
  const { cornerstoneViewportService } = services;
  const viewport = cornerstoneViewportService.getCornerstoneViewport(activeViewportId());
  const ids = [];
  if (viewport && viewport.getVolumeId) ids.push(viewport.getVolumeId());
  if (viewport && viewport.getActors) for (const actor of viewport.getActors()) ids.push(actor.referencedId || actor.uid);
  for (const id of ids) {
    const volume = id && cornerstone.cache.getVolume(id);
    if (volume && volume.imageData && id !== SEGMENTATION_ID) return volume;
  }
  return null;
}

function labelmap() {
  try {
    if (!services.segmentationService.getSegmentation(SEGMENTATION_ID)) return null;
    return services.segmentationService.getLabelmapVolume(SEGMENTATION_ID) || null;
  } catch (e) {
    return null; // no such segmentation (yet)
  }
}

function segments() {
  try {
    const segmentation = services.segmentationService.getSegmentation(SEGMENTATION_ID);
    return (segmentation && segmentation.segments) || {};
  } catch (e) {
    return {};
  }
}

function segmentIndexOf(name) {
  for (const [index, segment] of Object.entries(segments())) if (segment && segment.label === name) return Number(index);
  return null;
}

function triggerModified() {
  const { cornerstone, cornerstoneTools } = libraries();
  cornerstone.triggerEvent(cornerstone.eventTarget, cornerstoneTools.Enums.Events.SEGMENTATION_DATA_MODIFIED,
    { segmentationId: SEGMENTATION_ID });
}

/* ------------------------------------------------------------------------------------------------- the tools */

function registerTools() {
  const { cornerstoneTools } = libraries();
  if (!cornerstoneTools || !cornerstoneTools.ProbeTool) return;
  const { drawing, annotation } = cornerstoneTools;
  const make = (toolName, color) => {
    class SegVolPointTool extends cornerstoneTools.ProbeTool {
      constructor(props = {}, defaults = { configuration: {} }) {
        super(props, defaults);
        // a dot in the prompt's colour, no statistics text
        this.renderAnnotation = (enabledElement, svgDrawingHelper) => {
          const { viewport } = enabledElement;
          let found = annotation.state.getAnnotations(this.getToolName(), viewport.element);
          if (!found || !found.length) return false;
          found = this.filterInteractableAnnotationsForElement(viewport.element, found);
          if (!found || !found.length) return false;
          for (const item of found) {
            const canvas = viewport.worldToCanvas(item.data.handles.points[0]);
            drawing.drawHandles(svgDrawingHelper, item.annotationUID, '0', [canvas], { color, handleRadius: 5, fill: color });
          }
          return true;
        };
      }
    }
    SegVolPointTool.toolName = toolName;
    return SegVolPointTool;
  };
  for (const [name, color] of [[POSITIVE_TOOL, 'rgb(0, 220, 90)'], [NEGATIVE_TOOL, 'rgb(255, 60, 60)']]) {
    try {
      cornerstoneTools.addTool(make(name, color));
    } catch (e) {
      console.warn('SegVol: tool', name, 'not registered:', e && e.message);
    }
  }
}

// Add our tools to every tool group of the mode (passive: they take the mouse only when the panel activates them).
function addToolsToGroups() {
  const { toolGroupService } = services;
  for (const id of toolGroupService.getToolGroupIds ? toolGroupService.getToolGroupIds() : ['default', 'mpr']) {
    const group = toolGroupService.getToolGroup(id);
    if (!group || id === 'volume3d') continue;
    for (const name of [POSITIVE_TOOL, NEGATIVE_TOOL, BOX_TOOL]) {
      try {
        if (!group.hasTool(name)) {
          group.addTool(name);
          group.setToolPassive(name);
        }
      } catch (e) {
        console.warn('SegVol: cannot add', name, 'to tool group', id, e && e.message);
      }
    }
  }
}

function activateTool(toolName) {
  const { toolGroupService } = services;
  const group = toolGroupService.getToolGroupForViewport(activeViewportId());
  if (!group) return;
  const current = group.getActivePrimaryMouseButtonTool();
  if (current === toolName) return;
  if (current) group.setToolPassive(current);
  group.setToolActive(toolName, { bindings: [{ mouseButton: 1 }] });
}

function promptAnnotations() {
  const { cornerstoneTools } = libraries();
  const all = cornerstoneTools.annotation.state.getAllAnnotations() || [];
  return all.filter(a => a && a.metadata && [POSITIVE_TOOL, NEGATIVE_TOOL, BOX_TOOL].includes(a.metadata.toolName));
}

function removeAnnotations(toolNames) {
  const { cornerstoneTools, cornerstone } = libraries();
  for (const item of promptAnnotations()) {
    if (toolNames.includes(item.metadata.toolName)) cornerstoneTools.annotation.state.removeAnnotation(item.annotationUID);
  }
  const engine = cornerstone.getRenderingEngines()[0];
  if (engine) engine.render();
}

// Annotations -> voxel indices (i column, j row, k slice of the series as stored: what the server expects).
function collectPrompts() {
  const volume = imageVolume();
  if (!volume) return { positive: [], negative: [], box: null, rectangles: 0 };
  const [ni, nj, nk] = volume.dimensions;
  const toIndex = world => {
    const ijk = volume.imageData.worldToIndex(world).map(Math.round);
    return [Math.min(Math.max(ijk[0], 0), ni - 1), Math.min(Math.max(ijk[1], 0), nj - 1),
      Math.min(Math.max(ijk[2], 0), nk - 1)];
  };
  const positive = [];
  const negative = [];
  const corners = [];
  let rectangles = 0;
  for (const item of promptAnnotations()) {
    const points = (item.data && item.data.handles && item.data.handles.points) || [];
    if (!points.length) continue;
    if (item.metadata.toolName === POSITIVE_TOOL) positive.push(toIndex(points[0]));
    else if (item.metadata.toolName === NEGATIVE_TOOL) negative.push(toIndex(points[0]));
    else {
      rectangles++;
      for (const p of points) corners.push(toIndex(p));
    }
  }
  let box = null;
  if (corners.length) {
    const lo = [0, 1, 2].map(a => Math.min(...corners.map(c => c[a])));
    const hi = [0, 1, 2].map(a => Math.max(...corners.map(c => c[a])));
    box = [...lo, ...hi];
  }
  return { positive, negative, box, rectangles };
}

/* -------------------------------------------------------------------------------------------- the controller */

const state = {
  info: null,
  infoError: null,
  vocabulary: [],
  texts: [], // [{name, known}]
  running: false,
  saving: false,
  message: null, // {kind: 'info'|'success'|'error', text}
  lastRun: null,
  lastSave: null,
  produced: {}, // segment name -> {prompts, latency}
  dirty: false,
  retrain: null, // the last save's retrain answer
  retrainAt: 0,
  infoAt: 0,
  trainTask: null, // MONAI Label's last train task while a run is watched: {id, status}
  watchTrainUntil: 0,
  watchingClicks: false,
  sawRunning: false, // the watched run's stats said RUNNING (so a final status after it is this run's)
  polling: false,
  infoTriedAt: 0,
  root: null,
  timer: null,
  listening: false,
};

function setMessage(kind, text) {
  state.message = { kind, text, t: Date.now() };
  render();
}

async function loadInfo() {
  state.infoTriedAt = Date.now();
  if (state.watchTrainUntil && Date.now() < state.watchTrainUntil) await loadTrainTask();
  else if (state.trainTask && ACTIVE_TASK.includes(state.trainTask.status)) state.trainTask = null;
  try {
    const response = await fetch(serverURL('info/'), { headers: { accept: 'application/json' } });
    if (!response.ok) throw new Error(`HTTP ${response.status}: ${await readError(response)}`);
    state.info = await response.json();
    state.infoAt = Date.now();
    state.infoError = null;
    const names = new Set(Array.isArray(state.info.labels) ? state.info.labels : Object.keys(state.info.labels || {}));
    const model = state.info.models && state.info.models.segvol;
    if (model && model.labels) for (const name of Array.isArray(model.labels) ? model.labels : Object.keys(model.labels)) names.add(name);
    state.vocabulary = [...names].sort();
  } catch (error) {
    state.infoError = String(error.message || error);
  }
  const section = state.root && state.root.querySelector('[data-segvol="status"]');
  if (section) {
    try { section.replaceWith(modelStatusSection()); } catch (e) { console.warn('SegVol panel', e); }
  } else {
    render();
  }
}

// Segmentation '1' as the MONAI Label panel creates it (every served name a segment, sorted), so both panels agree.
async function ensureSegmentation() {
  if (labelmap()) return;
  const { cornerstone } = libraries();
  if (cornerstone.cache.getVolume(SEGMENTATION_ID)) return;
  if (!state.info) await loadInfo();
  const names = state.vocabulary.length ? state.vocabulary : ['object'];
  const segs = {};
  names.forEach((label, n) => {
    segs[n + 1] = { segmentIndex: n + 1, label, active: n === 0, locked: false, color: colorOf(label) };
  });
  await commands.runCommand('loadSegmentationsForViewport', {
    segmentations: [{ segmentationId: SEGMENTATION_ID, representation: { type: 'Labelmap' },
      config: { label: 'Segmentations', segments: segs } }],
  });
  for (let i = 0; i < 50 && !labelmap(); i++) await new Promise(r => setTimeout(r, 100));
}

function ensureSegment(name) {
  let index = segmentIndexOf(name);
  if (index) return index;
  const used = Object.keys(segments()).map(Number);
  index = Math.max(0, ...used) + 1;
  if (index > 255) throw new Error('no room for another segment (255 at most)');
  services.segmentationService.addSegment(SEGMENTATION_ID, { segmentIndex: index, label: name, color: colorOf(name) });
  return index;
}

// Voxel counts per segment index of the labelmap (index -> count).
function presentSegments() {
  const volume = labelmap();
  if (!volume) return {};
  const data = volume.voxelManager.getCompleteScalarDataArray();
  const counts = new Uint32Array(256);
  for (let i = 0; i < data.length; i++) counts[data[i]]++;
  const out = {};
  for (let v = 1; v < 256; v++) if (counts[v]) out[v] = counts[v];
  return out;
}

function addText(raw) {
  const typed = String(raw || '').trim();
  if (!typed) return;
  const lower = typed.toLowerCase();
  const known = state.vocabulary.find(n => n.toLowerCase() === lower);
  const name = known || typed;
  if (!state.texts.some(t => t.name === name)) state.texts.push({ name, known: !!known });
  render();
}

async function runSegVol() {
  if (state.running) return;
  const displaySet = activeDisplaySet();
  if (!displaySet) return setMessage('error', 'No image series in the active viewport.');
  const prompts = collectPrompts();
  const texts = state.texts.map(t => t.name);
  if (!texts.length && !prompts.box && !prompts.positive.length) {
    return setMessage('error', 'Give SegVol a prompt: a name, a box or a positive point.');
  }
  const params = {
    result_extension: '.nrrd', result_dtype: 'uint8', result_compress: false, restore_label_idx: false,
    client_id: 'segvol-ohif',
  };
  if (texts.length) params.texts = texts;
  if (state.texts.some(t => !t.known)) params.free_text = true;
  if (prompts.box) params.box = prompts.box;
  const points = [...prompts.positive, ...prompts.negative];
  if (points.length) {
    params.points = points;
    params.point_labels = [...prompts.positive.map(() => 1), ...prompts.negative.map(() => 0)];
  }
  state.running = true;
  setMessage('info', 'SegVol is running…');
  const started = performance.now();
  try {
    const url = new URL(serverURL('infer/segvol'));
    url.searchParams.append('image', displaySet.SeriesInstanceUID);
    url.searchParams.append('output', 'all');
    const form = new FormData();
    form.append('params', JSON.stringify(params));
    const response = await fetch(url.toString(), { method: 'POST', body: form });
    if (!response.ok) throw new Error(`SegVol failed (HTTP ${response.status}): ${await readError(response)}`);
    const parts = await response.formData();
    const meta = JSON.parse(parts.get('params'));
    const image = parts.get('image');
    if (!image) throw new Error('the server sent no label image');
    const { data } = parseNrrd(await image.arrayBuffer());
    await ensureSegmentation();
    const volume = labelmap();
    if (!volume) throw new Error('no labelmap to put the result in');
    const current = volume.voxelManager.getCompleteScalarDataArray();
    if (current.length !== data.length) {
      throw new Error(`the result has ${data.length} voxels, the labelmap ${current.length}: not the same grid`);
    }
    const names = meta.label_names || {};
    const valueToSegment = new Uint8Array(256);
    const replaced = new Uint8Array(256);
    const summary = [];
    for (const [name, value] of Object.entries(names)) {
      const index = ensureSegment(name);
      valueToSegment[value] = index;
      replaced[index] = 1;
      summary.push({ name, index, value });
    }
    // The new result replaces these segments' voxels; other segments (and brush work on them) are kept.
    const next = new Uint8Array(current.length);
    next.set(current);
    const counts = {};
    for (let i = 0; i < next.length; i++) {
      if (replaced[next[i]]) next[i] = 0;
    }
    for (let i = 0; i < data.length; i++) {
      const index = valueToSegment[data[i]];
      if (index && next[i] === 0) {
        next[i] = index;
        counts[index] = (counts[index] || 0) + 1;
      }
    }
    volume.voxelManager.setCompleteScalarDataArray(next);
    triggerModified();
    const latency = meta.latencies || {};
    const roundTrip = (performance.now() - started) / 1000;
    const used = meta.prompts || {};
    for (const s of summary) {
      state.produced[s.name] = {
        texts: texts.filter(t => t === s.name || names[t] === undefined), free: state.texts.some(t => t.name === s.name && !t.known),
        box: used.box || null, positive: (used.positive_points || []).length, negative: (used.negative_points || []).length,
        server_s: latency.total, voxels: counts[s.index] || 0,
        // what the saved DICOM SEG records for this segment (lib/seg_metadata.py): checkpoint, zoom mode, prompts
        provenance: { model: meta.model, mode: meta.mode, prompts: used },
      };
    }
    state.lastRun = { names: Object.keys(names), server_s: latency.total, round_trip_s: roundTrip, counts,
      prompts: used, encode_cached: ((meta.stats || {}).embedding_cache_hits || 0) > 0 };
    const found = summary.map(s => `${s.name} (${counts[s.index] || 0} voxels)`).join(', ');
    setMessage('success', `SegVol: ${found || 'nothing'} — server ${seconds(latency.total)}, round trip ${seconds(roundTrip)}`);
  } catch (error) {
    setMessage('error', String(error.message || error));
  } finally {
    state.running = false;
    render();
  }
}

async function saveLabel() {
  if (state.saving) return;
  const displaySet = activeDisplaySet();
  const volume = labelmap();
  if (!displaySet || !volume) return setMessage('error', 'Nothing to save: no labelmap on this series yet.');
  const present = presentSegments();
  const indices = Object.keys(present).map(Number).sort((a, b) => a - b);
  if (!indices.length) return setMessage('error', 'Nothing to save: the labelmap is empty.');
  const all = segments();
  const labelInfo = indices.map(idx => {
    const segment = all[idx] || {};
    const entry = { name: segment.label || `segment ${idx}`, idx, model_name: SEG_DESCRIPTION };
    const produced = state.produced[entry.name];
    if (produced && produced.provenance && produced.provenance.model) entry.provenance = produced.provenance;
    try {
      const color = services.segmentationService.getSegmentColor(activeViewportId(), SEGMENTATION_ID, idx);
      if (color && color.length >= 3) entry.color = Array.from(color).slice(0, 3).map(Number);
    } catch (e) { /* no colour */ }
    return entry;
  });
  const data = volume.voxelManager.getCompleteScalarDataArray();
  const bytes = data instanceof Uint8Array ? new Uint8Array(data) : Uint8Array.from(data);
  state.saving = true;
  setMessage('info', 'Saving to SegVol Label…');
  try {
    const url = new URL(serverURL('datastore/label'));
    url.searchParams.append('image', displaySet.SeriesInstanceUID);
    const form = new FormData();
    form.append('params', JSON.stringify({ label_info: labelInfo, client_id: 'segvol-ohif' }));
    form.append('label', new Blob([bytes]), 'label.bin');
    const response = await fetch(url.toString(), { method: 'PUT', body: form });
    if (!response.ok) throw new Error(`Not saved (HTTP ${response.status}): ${await readError(response)}. The labelmap is still here: save again.`);
    const body = await response.json();
    state.retrain = body.retrain || state.retrain;
    state.retrainAt = Date.now();
    state.lastSave = { names: labelInfo.map(l => l.name), image: body.image, at: new Date().toLocaleTimeString(), retrain: body.retrain || null };
    state.dirty = false;
    const counter = body.retrain && body.retrain.threshold ? ` Retrain counter ${body.retrain.count}/${body.retrain.threshold}.` : '';
    setMessage('success', `Saved ${labelInfo.length} segment(s): ${labelInfo.map(l => l.name).join(', ')}.${counter}`);
    loadInfo();
  } catch (error) {
    setMessage('error', String(error.message || error));
  } finally {
    state.saving = false;
    render();
  }
}

async function nextSample() {
  if (state.dirty && !window.confirm('The labelmap has changes that are not saved. Open the next sample anyway?')) return;
  const strategies = Object.keys((state.info && state.info.strategies) || {});
  const strategy = strategies.includes('random') ? 'random' : strategies[0] || 'random';
  setMessage('info', `Asking for the next sample (${strategy})…`);
  try {
    const response = await fetch(serverURL(`activelearning/${encodeURIComponent(strategy)}`), {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: '{}',
    });
    if (!response.ok) throw new Error(`No next sample (HTTP ${response.status}): ${await readError(response)}`);
    const sample = await response.json();
    const study = sample.StudyInstanceUID;
    if (!study) throw new Error(`the server named no study for ${sample.id || 'the next sample'}`);
    setMessage('success', `Opening the next sample: ${sample.id}`);
    const target = new URL(window.location.href);
    target.searchParams.set('StudyInstanceUIDs', study);
    window.location.assign(target.toString());
  } catch (error) {
    setMessage('error', String(error.message || error));
  }
}

/* ------------------------------------------------------------------------------------------------- rendering */

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

let suggestionsFor = '';
let activeToolButton = null;

/* A training run's status. The run's stats file (/info train_stats: status RUNNING, then FINISHED, BUDGET, STOPPED,
 * ERROR or FAILED, with epoch/total_epochs and the best validation Dice) is written by the training process once it has
 * started; until then MONAI Label's task (GET /train/, SUBMITTED or RUNNING) says a run was requested: STARTING. */
const ACTIVE_TRAIN = ['RUNNING', 'STARTING'];
const ACTIVE_TASK = ['SUBMITTED', 'RUNNING'];

function trainingStatus(stats) {
  const task = state.trainTask;
  const requested = task && ACTIVE_TASK.includes(task.status);
  if (stats.status === 'RUNNING') {
    if (requested) state.sawRunning = true;
    return 'RUNNING';
  }
  if (requested && !state.sawRunning) return 'STARTING'; // the stats still show the previous run
  return stats.status || (stats.task && stats.task.status) || (stats.epoch ? 'DONE' : 'never run');
}

function trainingActive() {
  if (state.trainTask && ACTIVE_TASK.includes(state.trainTask.status)) return true;
  const stats = (state.info && state.info.train_stats) || {};
  return Object.values(stats).some(s => s && (s.status === 'RUNNING' || (s.task && ACTIVE_TASK.includes(s.task.status))));
}

// MONAI Label's last train task (GET /train/), read only while a run is being watched: after a click on the MONAI
// Label panel's "Update Model" until the task ends (404: the request made no task).
async function loadTrainTask() {
  try {
    const response = await fetch(serverURL('train/'), { headers: { accept: 'application/json' } });
    if (response.status === 404) {
      state.trainTask = null;
      state.watchTrainUntil = 0;
      return;
    }
    if (!response.ok) return;
    const task = await response.json();
    state.trainTask = task && typeof task === 'object' ? { id: task.id, status: task.status } : null;
    if (!state.trainTask || !ACTIVE_TASK.includes(state.trainTask.status)) state.watchTrainUntil = 0;
  } catch (e) { /* the next poll tries again */ }
}

// A click on the stock panel's "Update Model" (or "Stop Training") starts watching the run: /info every 0.5 s.
function watchTrainButtons() {
  if (state.watchingClicks) return;
  state.watchingClicks = true;
  document.addEventListener('click', event => {
    const button = event.target && event.target.closest && event.target.closest('button');
    if (!button || !['Update Model', 'Stop Training'].includes(button.textContent.trim())) return;
    state.watchTrainUntil = Date.now() + 10 * 60 * 1000;
    state.sawRunning = false;
    setTimeout(() => loadInfo(), 1500);
  }, true);
}

function modelStatusSection() {
  const info = state.info;
  const rows = [];
  if (state.infoError) rows.push(el('div', { class: 'segvol-message error', text: `Server not reachable: ${state.infoError}` }));
  if (info) {
    const status = info.model_status || {};
    const serving = status.serving;
    const kind = serving ? serving.kind : status.wanted_kind;
    const kindText = kind === 'finetuned' || kind === 'fine-tuned' ? 'fine-tuned' : kind || 'unknown';
    const checkpoint = serving ? serving.checkpoint : status.wanted;
    rows.push(el('div', { 'data-segvol': 'model' },
      el('b', { text: 'Model: ' }), `${kindText} checkpoint`,
      serving ? '' : ' (loads on the first request)',
      el('div', { class: 'segvol-muted', text: checkpoint ? String(checkpoint).split('/').slice(-2).join('/') : 'no weights found' })));
    if (status.fallback) rows.push(el('div', { class: 'segvol-message error', text: 'The wanted checkpoint does not load: a fallback answers.' }));
    if (status.error && status.error.error) rows.push(el('div', { class: 'segvol-muted', text: `Last load error: ${String(status.error.error).slice(0, 200)}` }));
    if (status.pending) rows.push(el('div', { class: 'segvol-muted', 'data-segvol': 'pending', text: 'A newer checkpoint is published: the next SegVol run loads it.' }));
    const stats = info.train_stats ? Object.entries(info.train_stats) : [];
    for (const [name, s] of stats) {
      if (!s || typeof s !== 'object') continue;
      const statusText = trainingStatus(s);
      const epochs = s.total_epochs && statusText !== 'STARTING' ? `epoch ${s.epoch || 0}/${s.total_epochs}` : '';
      const dice = typeof s.best_metric === 'number' ? `best validation Dice ${s.best_metric.toFixed(3)}` : 'no validation Dice yet';
      const took = typeof s.total_time === 'number' && !ACTIVE_TRAIN.includes(statusText) ? `${seconds(s.total_time)}` : '';
      rows.push(el('div', { 'data-segvol': 'training', 'data-trainer': name, 'data-status': statusText },
        el('b', { text: 'Training: ' }), [statusText, epochs, dice, took].filter(Boolean).join(' · '),
        statusText === 'STARTING' ? el('div', { class: 'segvol-muted', text: 'Run requested: the training process is loading the labels.' }) : null,
        s.reason ? el('div', { class: 'segvol-muted', text: String(s.reason).slice(0, 200) }) : null));
    }
    const ds = info.datastore || {};
    rows.push(el('div', { class: 'segvol-muted', 'data-segvol': 'datastore',
      text: `Labelled ${ds.completed || 0}/${ds.total || 0} images` }));
  }
  // the counter as /info reports it (the server's, so labels other viewers stored into the PACS are in it too); the
  // last save's answer until the next /info
  const fromInfo = info && info.retrain;
  const retrain = fromInfo && state.retrain && state.retrainAt > state.infoAt ? { ...fromInfo, ...state.retrain }
    : fromInfo || state.retrain;
  let retrainText = 'not reported by this server';
  if (retrain && retrain.threshold) {
    retrainText = `${retrain.count}/${retrain.threshold} labels toward the next training run`;
    if (retrain.queued) retrainText += ' (a training run is queued)';
  } else if (retrain) {
    retrainText = 'automatic retraining off (--conf retrain_threshold)';
  }
  const retrainDetail = retrain && typeof retrain.total === 'number'
    ? `${retrain.total} label(s) counted in all${retrain.external ? `, ${retrain.external} stored into the PACS by other viewers` : ''}` +
      (retrain.last_queued && retrain.last_queued.ts ? ` · last run queued ${new Date(retrain.last_queued.ts * 1000).toLocaleString()}` : '')
    : '';
  rows.push(el('div', { 'data-segvol': 'retrain' }, el('b', { text: 'Retrain counter: ' }), retrainText,
    retrainDetail ? el('div', { class: 'segvol-muted', 'data-segvol': 'retrain-detail', text: retrainDetail }) : null));
  return el('section', { 'data-segvol': 'status' }, el('h3', { text: 'Model status' }), rows,
    el('button', { onClick: () => loadInfo(), title: 'Read /info again' }, 'Refresh'));
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

function promptSection() {
  const input = el('input', { type: 'text', placeholder: 'Structure name, e.g. liver (Enter adds it)', 'data-segvol': 'text',
    autocomplete: 'off', value: suggestionsFor });
  const suggest = el('div', { class: 'segvol-suggest', 'data-segvol': 'suggestions' });
  const fill = () => {
    suggest.innerHTML = '';
    const typed = input.value.trim().toLowerCase();
    suggestionsFor = input.value;
    if (!typed) return;
    const starts = state.vocabulary.filter(n => n.toLowerCase().startsWith(typed));
    const contains = state.vocabulary.filter(n => !n.toLowerCase().startsWith(typed) && n.toLowerCase().includes(typed));
    const matches = [...starts, ...contains].slice(0, 8);
    for (const name of matches) {
      suggest.appendChild(el('div', { text: name, 'data-name': name, onMousedown: e => {
        e.preventDefault();
        suggestionsFor = '';
        addText(name);
      } }));
    }
    if (!state.vocabulary.some(n => n.toLowerCase() === typed)) {
      suggest.appendChild(el('div', { class: 'segvol-muted', text: `Enter: send "${input.value.trim()}" as free text` }));
    }
  };
  input.addEventListener('input', fill);
  input.addEventListener('keydown', e => {
    if (e.key === 'Enter') {
      e.preventDefault();
      const value = input.value;
      suggestionsFor = '';
      addText(value);
    }
  });
  setTimeout(fill, 0);
  const chips = state.texts.map(t => el('span', { class: `segvol-chip${t.known ? '' : ' segvol-free'}`, 'data-text': t.name,
    title: t.known ? 'in the served vocabulary' : 'not in the vocabulary: sent to the model as free text' },
  t.name, t.known ? '' : ' (free text)',
  el('button', { title: 'Remove', onClick: () => { state.texts = state.texts.filter(x => x !== t); render(); } }, '×')));

  const prompts = collectPrompts();
  const toolButton = (label, tool, title) => el('button', {
    class: activeToolButton === tool ? 'segvol-active' : null, title, 'data-tool': tool,
    onClick: () => { activateTool(tool); activeToolButton = tool; render(); },
  }, label);
  return el('section', { 'data-segvol': 'prompts' }, el('h3', { text: 'SegVol prompts' }),
    el('div', null, input, suggest),
    el('div', { 'data-segvol': 'texts' }, chips.length ? chips : el('span', { class: 'segvol-muted', text: 'No name: the box and points alone.' })),
    el('div', null,
      toolButton('Box', BOX_TOOL, 'Draw a rectangle on one slice, then another on a second slice: the box spans both'),
      toolButton('+ Point', POSITIVE_TOOL, 'Click inside the structure'),
      toolButton('− Point', NEGATIVE_TOOL, 'Click where the structure is not')),
    el('div', { class: 'segvol-muted', 'data-segvol': 'box', text: boxText(prompts) }),
    el('div', { class: 'segvol-muted', 'data-segvol': 'points', text: pointsText(prompts) }),
    el('div', null,
      el('button', { onClick: () => { removeAnnotations([BOX_TOOL]); render(); } }, 'Clear box'),
      el('button', { onClick: () => { removeAnnotations([POSITIVE_TOOL, NEGATIVE_TOOL]); render(); } }, 'Clear points'),
      el('button', { onClick: () => { state.texts = []; render(); } }, 'Clear names')),
    el('div', null, el('button', { class: 'segvol-primary', 'data-segvol': 'run', disabled: state.running,
      onClick: runSegVol }, state.running ? 'Running…' : 'Run SegVol')),
    state.lastRun ? el('div', { class: 'segvol-muted', 'data-segvol': 'latency',
      text: `Last run: server ${seconds(state.lastRun.server_s)}, round trip ${seconds(state.lastRun.round_trip_s)}${state.lastRun.encode_cached ? ' (image encoding reused)' : ''}` }) : null);
}

function segmentsSection() {
  const present = presentSegments();
  const all = segments();
  const rows = Object.keys(present).map(Number).sort((a, b) => a - b).map(index => {
    const name = (all[index] && all[index].label) || `segment ${index}`;
    const produced = state.produced[name];
    const how = produced ? [produced.free ? 'free text' : (produced.texts.length ? 'text' : ''),
      produced.box ? `box [${produced.box.join(', ')}]` : '', produced.positive ? `${produced.positive} +pt` : '',
      produced.negative ? `${produced.negative} −pt` : '', `${seconds(produced.server_s)}`].filter(Boolean).join(', ') : 'MONAI Label panel / brush';
    return el('tr', { 'data-segment': name },
      el('td', null, el('button', { title: 'Make it the active segment (brush, eraser)', onClick: () => {
        services.segmentationService.setActiveSegment(SEGMENTATION_ID, index);
        setMessage('info', `Active segment: ${name}`);
      } }, name)),
      el('td', { text: `${present[index]}` }),
      el('td', { class: 'segvol-muted', text: how }));
  });
  return el('section', { 'data-segvol': 'segments' }, el('h3', { text: 'Segments in the labelmap' }),
    rows.length ? el('table', { class: 'segvol-table' }, el('tbody', null, rows)) : el('div', { class: 'segvol-muted', text: 'Empty.' }));
}

function render() {
  try {
    renderPanel();
  } catch (error) {
    // never take the viewer down: show what failed in the panel
    console.error('SegVol panel', error);
    if (state.root) state.root.textContent = `SegVol panel error: ${error && error.message}`;
  }
}

function renderPanel() {
  const root = state.root;
  if (!root) return;
  const keepFocus = document.activeElement && document.activeElement.getAttribute('data-segvol') === 'text';
  root.innerHTML = '';
  root.appendChild(el('style', { text: STYLE }));
  const series = activeDisplaySet();
  root.appendChild(el('div', { class: 'segvol-muted', 'data-segvol': 'series',
    text: series ? `${series.SeriesDescription || 'Series'} · ${series.numImageFrames || '?'} slices` : 'No image series open.' }));
  if (state.message) root.appendChild(el('div', { class: `segvol-message ${state.message.kind}`, 'data-segvol': 'message', role: 'status',
    'data-t': String(state.message.t) }, state.message.text));
  root.appendChild(promptSection());
  root.appendChild(segmentsSection());
  root.appendChild(el('section', { 'data-segvol': 'actions' }, el('h3', { text: 'Finish this case' }),
    el('button', { class: 'segvol-primary', 'data-segvol': 'save', disabled: state.saving, onClick: saveLabel },
      state.saving ? 'Saving…' : 'Save to SegVol Label'),
    el('button', { 'data-segvol': 'next', onClick: nextSample }, 'Next sample'),
    state.lastSave ? el('div', { class: 'segvol-muted', 'data-segvol': 'saved',
      text: `Saved at ${state.lastSave.at}: ${state.lastSave.names.join(', ')}${state.dirty ? ' (changed since)' : ''}` }) : null));
  root.appendChild(modelStatusSection());
  if (keepFocus) {
    const input = root.querySelector('[data-segvol="text"]');
    if (input) { input.focus(); input.setSelectionRange(input.value.length, input.value.length); }
  }
}

// Only the parts that viewer events change are redrawn (box/points text, the segment table), so a button the annotator
// is clicking is never replaced under the mouse.
function refreshPromptInfo() {
  const root = state.root;
  if (!root) return;
  const prompts = collectPrompts();
  const box = root.querySelector('[data-segvol="box"]');
  if (box) box.textContent = boxText(prompts);
  const points = root.querySelector('[data-segvol="points"]');
  if (points) points.textContent = pointsText(prompts);
}

function refreshSegments() {
  const root = state.root;
  const old = root && root.querySelector('[data-segvol="segments"]');
  if (old) old.replaceWith(segmentsSection());
}

function listen() {
  if (state.listening) return;
  state.listening = true;
  const { cornerstone, cornerstoneTools } = libraries();
  const events = cornerstoneTools.Enums.Events;
  const debounce = fn => {
    let pending = null;
    return () => {
      if (pending) return;
      pending = setTimeout(() => { pending = null; try { fn(); } catch (e) { console.warn('SegVol panel', e); } }, 300);
    };
  };
  const prompts = debounce(refreshPromptInfo);
  const labels = debounce(refreshSegments);
  for (const name of [events.ANNOTATION_COMPLETED, events.ANNOTATION_REMOVED, events.ANNOTATION_MODIFIED]) {
    if (name) cornerstone.eventTarget.addEventListener(name, prompts);
  }
  cornerstone.eventTarget.addEventListener(events.SEGMENTATION_DATA_MODIFIED, () => { state.dirty = true; labels(); });
}

function mount(node) {
  if (!node) {
    state.root = null;
    if (state.timer) clearInterval(state.timer);
    state.timer = null;
    return;
  }
  state.root = node;
  node.className = 'segvol-panel';
  render();
  loadInfo();
  try { listen(); } catch (e) { console.warn('SegVol: no viewer events', e); }
  try { watchTrainButtons(); } catch (e) { console.warn('SegVol: not watching the train button', e); }
  // /info every 15 s; every 0.5 s while a training run is starting or running (its status and epochs: a short run
  // on a small dataset is RUNNING for about 2 s, which a slower poll can miss)
  if (!state.timer) {
    state.timer = setInterval(() => {
      if (state.running || state.saving || state.polling) return;
      const watching = trainingActive() || (state.watchTrainUntil && Date.now() < state.watchTrainUntil);
      if (!watching && Date.now() - state.infoTriedAt < 15000) return;
      state.polling = true;
      loadInfo().finally(() => { state.polling = false; });
    }, 500);
  }
}

function SegVolPanel() {
  // One host <div>: React 18 element data (no React import needed), filled by mount() through its ref.
  return { $$typeof: REACT_ELEMENT, type: 'div', key: null, ref: mount, props: { 'data-segvol': 'panel' }, _owner: null };
}

/* ---------------------------------------------------------------------------------------------- the extension */

const extension = {
  id: EXTENSION_ID,
  preRegistration({ servicesManager, commandsManager, extensionManager }) {
    services = servicesManager.services;
    commands = commandsManager;
    extensions = extensionManager;
  },
  getPanelModule() {
    return [{
      name: 'segvol',
      iconName: 'tab-segmentation',
      iconLabel: 'SegVol',
      label: 'SegVol',
      secondaryLabel: 'SegVol',
      component: SegVolPanel,
    }];
  },
  // called by segvol-mode.js on mode enter, once the tool groups exist
  getUtilityModule() {
    return [{
      name: 'segvol',
      exports: {
        onModeEnter: () => {
          registerTools();
          addToolsToGroups();
        },
        state,
      },
    }];
  },
};

export default extension;
