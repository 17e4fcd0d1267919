#!/usr/bin/env node
/*
 * Drives OHIF v3 (the build shipped inside the monailabel package, served by the app at /ohif/) in headless Chromium
 * for tests/e2e/test_ohif_e2e.py. Usage: node ohif_driver.js CONFIG.json
 *
 * CONFIG: {phase: "annotate" | "reopen", server, study, series, artifacts, chromium, timeout_s,
 *          auto_model, class_model, class_label, paint_label}
 * Writes ARTIFACTS/<phase>.json (rewritten after every step, so a crash still leaves the steps done so far) and
 * screenshots ARTIFACTS/<phase>-*.png; exits 0 when every step passed, 1 otherwise.
 *
 * phase "annotate": open the study in the MONAI Label mode, connect the MONAI Label panel, run Auto-Segmentation,
 *   run a Class Prompt, correct the result with OHIF's circular brush, save the corrected labelmap to the server
 *   (PUT /datastore/label, the call of the plugin's MonaiLabelClient.save_label), then export it with OHIF's own
 *   "store segmentation" (DICOM SEG through the DICOMweb data source, STOW via the server's /proxy/dicom) -- first
 *   with the PACS failing (the error must be shown and the labelmap kept), then for real.
 * phase "reopen": open the study again and list its series (the saved DICOM SEGs must be there).
 */
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { chromium } = require('playwright-core');

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const ART = cfg.artifacts;
fs.mkdirSync(ART, { recursive: true });
const result = { phase: cfg.phase, steps: [], console_errors: [], ok: false };
const save = () => fs.writeFileSync(path.join(ART, `${cfg.phase}.json`), JSON.stringify(result, null, 1));
const t0 = Date.now();
const elapsed = () => (Date.now() - t0) / 1000;

async function step(name, fn) {
  const start = Date.now();
  const entry = { name, ok: false };
  result.steps.push(entry);
  try {
    Object.assign(entry, (await fn()) || {});
    entry.ok = true;
  } catch (error) {
    entry.error = String((error && error.stack) || error).slice(0, 2000);
    throw error;
  } finally {
    entry.seconds = (Date.now() - start) / 1000;
    console.error(`[driver] ${name}: ${entry.ok ? 'ok' : 'FAILED'} (${entry.seconds.toFixed(1)} s, ${elapsed().toFixed(0)} s total)`);
    save();
  }
}

/* ---- code evaluated in the page ---- */

// Labelmap statistics of OHIF's segmentation '1' (the one the MONAI Label panel creates): voxels per segment, per
// slice (keyed by the source SOPInstanceUID) and the in-plane centroid per slice, for comparison with the DICOM SEGs.
const LABELMAP_STATS = () => {
  const { segmentationService } = window.services;
  const volume = segmentationService.getLabelmapVolume('1');
  if (!volume) return null;
  const data = volume.voxelManager.getCompleteScalarDataArray();
  const [cols, rows, slices] = volume.dimensions;
  const cs = window.cornerstone;
  const engine = cs.getRenderingEngines()[0];
  const source = cs.cache.getVolume(engine.getViewport('mpr-axial').getVolumeId());
  const sops = source.imageIds.map(id => (id.match(/instances\/([^/]+)/) || [])[1]);
  const segments = segmentationService.getSegmentation('1').segments;
  const perSegment = {};
  const plane = cols * rows;
  for (let k = 0; k < slices; k++) {
    const base = k * plane;
    for (let p = 0; p < plane; p++) {
      const v = data[base + p];
      if (!v) continue;
      let s = perSegment[v];
      if (!s) s = perSegment[v] = { index: v, label: segments[v] ? segments[v].label : null, total: 0, slices: {} };
      s.total++;
      const sop = sops[k];
      let sl = s.slices[sop];
      if (!sl) sl = s.slices[sop] = { k, count: 0, sum_i: 0, sum_j: 0 };
      sl.count++;
      sl.sum_i += p % cols;
      sl.sum_j += Math.floor(p / cols);
    }
  }
  return { dimensions: volume.dimensions, dtype: data.constructor.name, length: data.length,
    sop_order: sops, segments: Object.values(perSegment) };
};

const SEGMENT_INDEX = label => {
  const segments = window.services.segmentationService.getSegmentation('1').segments;
  for (const [index, segment] of Object.entries(segments)) if (segment && segment.label === label) return Number(index);
  return null;
};

// PUT /datastore/label?image=<series> with form fields params (JSON) and label ("label.bin": the raw uint8 labelmap),
// i.e. MonaiLabelClient.save_label of the OHIF plugin. label_info lists the segments present, in index order (MONAI
// Label names the DICOM SEG segments from it in that order).
const SAVE_LABEL = async ({ server, series }) => {
  const { segmentationService } = window.services;
  const volume = segmentationService.getLabelmapVolume('1');
  const data = volume.voxelManager.getCompleteScalarDataArray();
  const bytes = data instanceof Uint8Array ? data : Uint8Array.from(data);
  const present = new Set();
  for (let i = 0; i < bytes.length; i++) if (bytes[i]) present.add(bytes[i]);
  const segments = segmentationService.getSegmentation('1').segments;
  const labelInfo = [...present].sort((a, b) => a - b).map(idx => {
    const info = { name: segments[idx].label, idx, model_name: 'SegVol Label' };
    const color = segmentationService.getSegmentColor('mpr-axial', '1', idx);
    if (color && color.length >= 3) info.color = Array.from(color).slice(0, 3);
    return info;
  });
  const form = new FormData();
  form.append('params', JSON.stringify({ label_info: labelInfo, model: 'segvol', client_id: 'ohif-e2e' }));
  form.append('label', new Blob([bytes]), 'label.bin');
  const url = new URL('datastore/label', server + '/');
  url.searchParams.append('image', series);
  const response = await fetch(url.toString(), { method: 'PUT', body: form });
  const text = await response.text();
  let body = null;
  try { body = JSON.parse(text); } catch (e) { body = text.slice(0, 500); }
  return { status: response.status, body, label_info: labelInfo };
};

/* ---- helpers ---- */

const notificationsSince = (page, t) => page.evaluate(t => window.__notifications.filter(n => n.t >= t), t);

async function waitForNotification(page, since, type, timeoutMs) {
  await page.waitForFunction(({ since, type }) => window.__notifications.some(n => n.t >= since && n.type === type),
    { since, type }, { timeout: timeoutMs, polling: 100 });
  return (await notificationsSince(page, since)).filter(n => n.type === type);
}

// Wait for one of the notifications ``texts`` (by message) shown since ``since`` (ms); -> its message.
async function waitForMessage(page, since, texts, timeoutMs) {
  const handle = await page.waitForFunction(({ since, texts }) => {
    const hit = window.__notifications.find(n => n.t >= since && texts.includes(n.message));
    return hit ? hit.message : null;
  }, { since, texts }, { timeout: timeoutMs, polling: 100 }).catch(() => null);
  if (!handle) throw new Error(`none of ${JSON.stringify(texts)} was shown within ${timeoutMs / 1000} s`);
  return handle.jsonValue();
}

async function openStudy(page) {
  await page.goto(`${cfg.server}/ohif/monai-label?StudyInstanceUIDs=${cfg.study}`, { waitUntil: 'load' });
  await page.waitForFunction(() => {
    const cs = window.cornerstone;
    const engine = cs && cs.getRenderingEngines && cs.getRenderingEngines()[0];
    const vp = engine && engine.getViewport('mpr-axial');
    if (!vp || !vp.getVolumeId || !vp.getVolumeId()) return false;
    const volume = cs.cache.getVolume(vp.getVolumeId());
    return !!(volume && volume.loadStatus && volume.loadStatus.loaded);
  }, null, { timeout: 120000, polling: 500 });
  // Record every notification OHIF shows the user (title, message, type), to assert on what the user was told. The
  // MONAI Label tabs use their own UINotificationService instances, so the class's show() is wrapped.
  await page.evaluate(() => {
    const proto = Object.getPrototypeOf(window.services.uiNotificationService);
    if (proto.__recorded) return;
    window.__notifications = [];
    const show = proto.show;
    proto.show = function (options) {
      window.__notifications.push({ title: options.title, message: String(options.message), type: options.type,
        t: Date.now() });
      return show.call(this, options);
    };
    proto.__recorded = true;
  });
  const hide = page.getByRole('button', { name: 'Confirm and Hide' });
  if (await hide.count()) await hide.first().click().catch(() => {});
  await page.waitForTimeout(1500);
}

const axial = page => page.locator('[data-viewport-uid="mpr-axial"]');

async function shot(page, name) {
  const viewport = path.join(ART, `${cfg.phase}-${name}-axial.png`);
  await axial(page).screenshot({ path: viewport });
  await page.screenshot({ path: path.join(ART, `${cfg.phase}-${name}.png`) });
  return viewport;
}

function tab(page, title) {
  return page.locator('div.tab').filter({ has: page.locator('label.tab-label', { hasText: title }) });
}

/* ---- phases ---- */

async function annotate(page) {
  await step('open study in OHIF (monai-label mode)', async () => {
    await openStudy(page);
    return { screenshot: await shot(page, 'opened') };
  });

  await step('connect the MONAI Label panel', async () => {
    await page.fill('#monailabelServerURL', `${cfg.server}/`);
    const since = await page.evaluate(() => Date.now());
    await page.locator('table.settingsTable button.actionButton').first().click();
    const seen = await waitForMessage(page, since, ['Connected to MONAI Label - Successful',
      'Failed to Connect to MONAI Label'], 60000);
    if (seen !== 'Connected to MONAI Label - Successful') throw new Error(seen);
    await page.locator('label.tab-label', { hasText: 'Auto-Segmentation' }).waitFor({ timeout: 30000 });
    await page.waitForFunction(() => !!window.services.segmentationService.getLabelmapVolume('1'), null,
      { timeout: 30000 });
    await page.waitForTimeout(1500);
    return { screenshot: await shot(page, 'connected') };
  });

  await step('auto-segmentation', async () => {
    const auto = tab(page, 'Auto-Segmentation');
    await auto.locator('select.selectBox').selectOption(cfg.auto_model);
    const since = await page.evaluate(() => Date.now());
    await auto.locator('button[title="Run Segmentation"]').click();
    const seen = await waitForMessage(page, since, ['Running Segmentation - Successful', 'Failed to Run Segmentation'],
      cfg.timeout_s * 1000);
    if (seen !== 'Running Segmentation - Successful') throw new Error(seen);
    await page.waitForTimeout(2000);
    return { stats: await page.evaluate(LABELMAP_STATS), screenshot: await shot(page, 'auto') };
  });

  await step('class prompt', async () => {
    await page.locator('label.tab-label', { hasText: 'Class Prompts' }).click();
    const classes = tab(page, 'Class Prompts');
    await classes.locator('select.selectBox').selectOption(cfg.class_model);
    const row = classes.locator('tr').filter({ has: page.locator('td', { hasText: new RegExp(`^${cfg.class_label}$`) }) });
    await row.locator('input[type="checkbox"]').check();
    const since = await page.evaluate(() => Date.now());
    await classes.locator('button[title="Run Segmentation VISTA"]').click();
    const seen = await waitForMessage(page, since, ['Run Class Based Inference - Successful',
      'Failed to Run Class Based Inference'], cfg.timeout_s * 1000);
    if (seen !== 'Run Class Based Inference - Successful') throw new Error(seen);
    await page.waitForTimeout(2000);
    return { stats: await page.evaluate(LABELMAP_STATS), segment_index: await page.evaluate(SEGMENT_INDEX, cfg.class_label),
      screenshot: await shot(page, 'class') };
  });

  await step('correct with the brush', async () => {
    // The shipped monai-label mode has no segmentation panel, so its brush toolbox is not on screen; the brush tool
    // itself is in the viewport's tool group: activate it as the toolbox button would, then paint with the mouse.
    const index = await page.evaluate(SEGMENT_INDEX, cfg.paint_label);
    if (!index) throw new Error(`no segment named ${cfg.paint_label}`);
    await page.evaluate(({ index }) => {
      const { segmentationService, toolGroupService } = window.services;
      segmentationService.setActiveSegment('1', index);
      const group = toolGroupService.getToolGroupForViewport('mpr-axial');
      const current = group.getActivePrimaryMouseButtonTool();
      if (current) group.setToolPassive(current);
      group.setToolActive('CircularBrush', { bindings: [{ mouseButton: 1 }] });
      window.cornerstoneTools.utilities.segmentation.setBrushSizeForToolGroup(group.id, 12);
    }, { index });
    const box = await axial(page).boundingBox();
    const cx = box.x + box.width / 2;
    const cy = box.y + box.height / 2;
    await page.mouse.move(cx - 60, cy - 30);
    await page.mouse.down();
    for (let s = 1; s <= 20; s++) await page.mouse.move(cx - 60 + s * 6, cy - 30 + s * 2);
    await page.mouse.up();
    await page.waitForTimeout(1500);
    const slice = await page.evaluate(() => {
      const vp = window.cornerstone.getRenderingEngines()[0].getViewport('mpr-axial');
      return { index: vp.getSliceIndex ? vp.getSliceIndex() : null };
    });
    return { segment_index: index, viewport_slice: slice, stats: await page.evaluate(LABELMAP_STATS),
      screenshot: await shot(page, 'corrected') };
  });

  await step('save the corrected label to MONAI Label (PUT /datastore/label)', async () => {
    const answer = await page.evaluate(SAVE_LABEL, { server: cfg.server, series: cfg.series });
    if (answer.status !== 200) throw new Error(`PUT /datastore/label answered ${answer.status}: ${JSON.stringify(answer.body)}`);
    return { response: answer.body, label_info: answer.label_info, stats: await page.evaluate(LABELMAP_STATS) };
  });

  const stowPattern = '**/proxy/dicom/wado/studies';
  const exportSeg = async description => {
    page.evaluate(() => {
      window.__storeDone = null;
      // The CORNERSTONE context's storeSegmentation (storeSegmentationCommand): report dialog, DICOM SEG written by
      // dcmjs, stored through the active DICOMweb data source, then shown -- what OHIF's segmentation panel runs.
      Promise.resolve(window.commandsManager.runCommand('storeSegmentation', { segmentationId: '1' }, 'CORNERSTONE'))
        .then(() => { window.__storeDone = 'resolved'; }, e => { window.__storeDone = 'rejected: ' + e.message; });
    });
    const dialog = page.locator('.DraggableItem').filter({ has: page.locator('h6', { hasText: 'Create Report' }) });
    await dialog.waitFor({ timeout: 30000 });
    await dialog.locator('input[type="text"]').fill(description);
    await dialog.locator('button[data-cy="Save-btn"]').click();
    await page.waitForFunction(() => window.__storeDone !== null, null, { timeout: 120000, polling: 250 });
    return page.evaluate(() => window.__storeDone);
  };

  await step('export DICOM SEG from OHIF while the PACS fails: error shown, nothing lost', async () => {
    let stowRequests = 0;
    await page.route(stowPattern, route => {
      if (route.request().method() !== 'POST') return route.continue();
      stowRequests++;
      return route.fulfill({ status: 503, contentType: 'text/plain', body: 'PACS unavailable (simulated by the e2e test)' });
    });
    const before = await page.evaluate(LABELMAP_STATS);
    const since = await page.evaluate(() => Date.now());
    const outcome = await exportSeg('SegVol e2e (must fail)');
    const errors = await waitForNotification(page, since, 'error', 20000);
    const screenshot = await shot(page, 'save-failed');  // the error toast is on screen now
    await page.unroute(stowPattern);
    const after = await page.evaluate(LABELMAP_STATS);
    if (!outcome.startsWith('rejected')) throw new Error(`store did not fail: ${outcome}`);
    if (!after) throw new Error('the labelmap is gone after the failed save');
    const totals = s => s.segments.map(x => [x.index, x.total]).sort().join(';');
    if (totals(before) !== totals(after)) throw new Error('the labelmap changed after the failed save');
    await page.waitForTimeout(6500); // let the error toast go
    return { outcome, stow_requests: stowRequests, errors, stats: after, screenshot };
  });

  await step('export DICOM SEG from OHIF (STOW through /proxy/dicom to the PACS)', async () => {
    const stored = [];
    const listener = response => {
      if (response.request().method() === 'POST' && response.url().includes('/proxy/dicom/wado/studies')) {
        stored.push({ url: response.url(), status: response.status() });
      }
    };
    page.on('response', listener);
    const since = await page.evaluate(() => Date.now());
    const outcome = await exportSeg('SegVol e2e OHIF export');
    page.off('response', listener);
    const shown = await waitForNotification(page, since, 'success', 20000);
    const screenshot = await shot(page, 'exported');
    if (outcome !== 'resolved') throw new Error(`store failed: ${outcome}`);
    return { outcome, stow: stored, shown, screenshot };
  });
}

async function reopen(page) {
  await step('reopen the study after the server restart', async () => {
    await openStudy(page);
    await page.waitForTimeout(2000);
    const series = await page.evaluate(() => window.services.displaySetService.getActiveDisplaySets().map(d => ({
      modality: d.Modality, description: d.SeriesDescription, series: d.SeriesInstanceUID,
      referenced: d.referencedSeriesInstanceUID || (d.referencedDisplaySetInstanceUID ? 'display-set' : null),
    })));
    return { series, screenshot: await shot(page, 'reopened') };
  });

  await step('load the saved DICOM SEG back into OHIF', async () => {
    // double-click its thumbnail: OHIF reads the SEG (DICOMweb through the server's proxy) into a labelmap
    await page.getByText(cfg.seg_description, { exact: true }).first().dblclick();
    const handle = await page.waitForFunction(description => {
      const { segmentationService } = window.services;
      const segmentation = segmentationService.getSegmentations().find(s => s.label === description);
      const volume = segmentation && segmentationService.getLabelmapVolume(segmentation.segmentationId);
      if (!volume) return null;
      const data = volume.voxelManager.getCompleteScalarDataArray();
      const counts = {};
      for (let i = 0; i < data.length; i++) if (data[i]) counts[data[i]] = (counts[data[i]] || 0) + 1;
      const totals = {};
      for (const [index, count] of Object.entries(counts)) totals[segmentation.segments[index].label] = count;
      return { segments: Object.values(segmentation.segments).filter(Boolean).map(x => [x.segmentIndex, x.label]),
        totals, dimensions: volume.dimensions };
    }, cfg.seg_description, { timeout: 60000, polling: 500 });
    const loaded = await handle.jsonValue();
    await page.waitForTimeout(1500);
    return { loaded, screenshot: await shot(page, 'seg-loaded') };
  });
}

(async () => {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'segvol-e2e-chromium-'));
  let context = null;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: cfg.chromium,
      headless: true,
      viewport: { width: 1600, height: 1000 },
      args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
        '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
    });
    const page = context.pages()[0] || await context.newPage();
    page.setDefaultTimeout(60000);
    const recent = [];
    page.on('console', m => {
      const text = m.text();
      if (/Set value to model directly|Crosshairs mapping|GL Driver Message|measurement mapping/.test(text)) return;
      recent.push(`${m.type()}: ${text.slice(0, 400)}`);
      if (recent.length > 80) recent.shift();
      if (m.type() === 'error') result.console_errors.push(text.slice(0, 300));
    });
    result.console_tail = recent;
    page.on('pageerror', e => result.console_errors.push('pageerror: ' + String(e).slice(0, 300)));
    // Nothing may leave the machine: the OHIF build asks fonts.googleapis.com for a web font.
    await page.route(/^https?:\/\/(?!127\.0\.0\.1|localhost)/, route => route.abort());
    if (cfg.phase === 'annotate') await annotate(page);
    else if (cfg.phase === 'reopen') await reopen(page);
    else throw new Error(`unknown phase ${cfg.phase}`);
    result.ok = true;
  } catch (error) {
    result.error = String((error && error.stack) || error).slice(0, 3000);
    try {
      const page = context && context.pages()[0];
      if (page) await page.screenshot({ path: path.join(ART, `${cfg.phase}-error.png`) });
    } catch (e) { /* ignore */ }
  } finally {
    result.seconds = elapsed();
    save();
    if (context) await context.close().catch(() => {});
    fs.rmSync(profile, { recursive: true, force: true });
  }
  process.exit(result.ok ? 0 : 1);
})();
