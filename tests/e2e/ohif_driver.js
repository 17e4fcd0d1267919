#!/usr/bin/env node
/*
 * Drives OHIF v3 (the build shipped inside the monailabel package, served by the app at /ohif/ with SegVol Label's
 * app-config.js, mode and panel from apps/segvol/ohif) in headless Chromium for tests/e2e/test_ohif_e2e.py.
 * Usage: node ohif_driver.js CONFIG.json
 *
 * CONFIG: {phase: "annotate" | "reopen", server, study, series, artifacts, chromium, timeout_s, auto_model,
 *          class_model, class_label, paint_label, seg_description, text_prefix, text_label, free_text,
 *          train_timeout_s}
 * Writes ARTIFACTS/<phase>.json (rewritten after every step, so a crash still leaves the steps done so far) and
 * screenshots ARTIFACTS/<phase>-*.png; exits 0 when every step passed, 1 otherwise.
 *
 * Every step the UI offers is done by clicking and typing, as an annotator would; the driver only reads the viewer's
 * state (labelmap statistics, the requests the page sends) to report what happened. The one exception is a save
 * failure, simulated by answering the page's PUT /datastore/label with a 502 in the browser.
 *
 * phase "annotate": open the study, connect the MONAI Label panel, Auto-Segmentation, a Class Prompt; in the SegVol
 *   panel type a name (picked from the suggestions) and a free-text name, draw a box on two slices, a negative click,
 *   Run SegVol; a positive click and run again; paint with the brush and erase in OHIF's segmentation panel; Save to
 *   SegVol Label while the server fails (error shown, labelmap kept), then for real; Update Model (the MONAI Label
 *   panel) and the run's status followed in the SegVol panel until it ends; Next sample.
 * phase "reopen": open the study again (after a server restart), read the SegVol panel's model status, list the
 *   series (the saved DICOM SEG must be there) and load the saved SEG.
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

async function waitForVolume(page) {
  await page.waitForFunction(() => {
    const cs = window.cornerstone;
    const engine = cs && cs.getRenderingEngines && cs.getRenderingEngines()[0];
    const vp = engine && engine.getViewport('mpr-axial');
    if (!vp || !vp.getVolumeId || !vp.getVolumeId()) return false;
    const volume = cs.cache.getVolume(vp.getVolumeId());
    return !!(volume && volume.loadStatus && volume.loadStatus.loaded);
  }, null, { timeout: 120000, polling: 500 });
}

async function openStudy(page) {
  await page.goto(`${cfg.server}/ohif/monai-label?StudyInstanceUIDs=${cfg.study}`, { waitUntil: 'load' });
  await waitForVolume(page);
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

// A panel element's picture while the panel re-renders (the training row changes every poll): the element's own
// screenshot waits for it to be stable and fails when it is replaced meanwhile, so try a few times, then fall back
// to the page's picture clipped to where the element is. Returns the error text when no picture could be taken.
async function elementShot(page, locator, file) {
  let error = null;
  for (let attempt = 0; attempt < 3; attempt += 1) {
    try {
      await locator.screenshot({ path: file, timeout: 5000 });
      return null;
    } catch (e) {
      error = String(e);
      await page.waitForTimeout(200);
    }
  }
  try {
    await locator.scrollIntoViewIfNeeded({ timeout: 5000 });
    const box = await locator.boundingBox({ timeout: 5000 });
    if (box && box.width > 0 && box.height > 0) {
      await page.screenshot({ path: file, clip: box });
      return null;
    }
    error = `${error}; no box to clip to`;
  } catch (e) {
    error = `${error}; clip: ${e}`;
  }
  return error;
}

function tab(page, title) {
  return page.locator('div.tab').filter({ has: page.locator('label.tab-label', { hasText: title }) });
}

/* ---- phases ---- */

const panelTab = (page, name) => page.locator(`[data-cy="${name}-btn"]`);
const segvol = (page, what) => page.locator(`[data-segvol="${what}"]`);

// The SegVol panel's status line after an action started at ``since``: waits for a success or error message.
async function panelOutcome(page, since, timeoutMs) {
  await page.waitForFunction(since => {
    const m = document.querySelector('[data-segvol="message"]');
    return m && !m.classList.contains('info') && Number(m.getAttribute('data-t') || 0) >= since;
  }, since, { timeout: timeoutMs, polling: 250 });
  const message = segvol(page, 'message');
  return { kind: (await message.getAttribute('class')).replace('segvol-message', '').trim(), text: await message.innerText() };
}

// The multipart form field ``params`` of a request the page sent (observed, not made, by the driver).
function formParams(request) {
  const body = request.postDataBuffer();
  if (!body) return null;
  const text = body.toString('latin1');
  const at = text.indexOf('name="params"');
  if (at < 0) return null;
  const start = text.indexOf('\r\n\r\n', at) + 4;
  const end = text.indexOf('\r\n--', start);
  return JSON.parse(text.slice(start, end));
}

async function drag(page, from, to, steps = 12) {
  await page.mouse.move(from[0], from[1]);
  await page.mouse.down();
  for (let s = 1; s <= steps; s++) {
    await page.mouse.move(from[0] + (to[0] - from[0]) * s / steps, from[1] + (to[1] - from[1]) * s / steps);
  }
  await page.mouse.up();
}

const SLICE = () => {
  const vp = window.cornerstone.getRenderingEngines()[0].getViewport('mpr-axial');
  return vp.getSliceIndex ? vp.getSliceIndex() : null;
};

async function annotate(page) {
  let box = null;
  let centre = null;

  await step('open study in OHIF (SegVol Label mode)', async () => {
    await openStudy(page);
    box = await axial(page).boundingBox();
    centre = [box.x + box.width / 2, box.y + box.height / 2];
    const tabs = await page.locator('[data-cy$="-btn"]').evaluateAll(n => n.map(e => e.getAttribute('data-cy')));
    await segvol(page, 'prompts').waitFor({ timeout: 30000 });
    return { tabs, screenshot: await shot(page, 'opened') };
  });

  await step('connect the MONAI Label panel', async () => {
    await panelTab(page, 'monailabel').click();
    const url = await page.inputValue('#monailabelServerURL'); // preset to this server by our app-config.js
    const since = await page.evaluate(() => Date.now());
    await page.locator('table.settingsTable button.actionButton').first().click();
    const seen = await waitForMessage(page, since, ['Connected to MONAI Label - Successful',
      'Failed to Connect to MONAI Label'], 60000);
    if (seen !== 'Connected to MONAI Label - Successful') throw new Error(seen);
    await page.locator('label.tab-label', { hasText: 'Auto-Segmentation' }).waitFor({ timeout: 30000 });
    await page.waitForFunction(() => !!window.services.segmentationService.getLabelmapVolume('1'), null,
      { timeout: 30000 });
    await page.waitForTimeout(1500);
    return { server_url: url, screenshot: await shot(page, 'connected') };
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

  await step('SegVol prompts: text with autocomplete, free text, a box on two slices, a negative click', async () => {
    await panelTab(page, 'segvol').click();
    const input = segvol(page, 'text');
    await input.click();
    await input.type(cfg.text_prefix, { delay: 30 });
    const suggestion = segvol(page, 'suggestions').locator(`[data-name="${cfg.text_label}"]`);
    await suggestion.waitFor({ timeout: 10000 });
    const suggestions = await segvol(page, 'suggestions').locator('[data-name]').evaluateAll(n => n.map(e => e.textContent));
    await suggestion.click();
    await segvol(page, 'text').click();
    await segvol(page, 'text').type(cfg.free_text, { delay: 20 });
    await page.keyboard.press('Enter');
    const chips = await segvol(page, 'texts').locator('[data-text]').evaluateAll(n => n.map(e => ({
      name: e.getAttribute('data-text'), free: e.classList.contains('segvol-free'), shown: e.textContent })));
    // the box: a rectangle on this slice, another 6 slices further (mouse wheel scrolls the axial view)
    await segvol(page, 'prompts').locator(`button[data-tool="RectangleROI"]`).click();
    const first = await page.evaluate(SLICE);
    await drag(page, [centre[0] - 70, centre[1] - 60], [centre[0] + 50, centre[1] + 40]);
    await page.mouse.move(centre[0] + 100, centre[1] + 100);
    for (let n = 0; n < 6; n++) { await page.mouse.wheel(0, 100); await page.waitForTimeout(150); }
    const second = await page.evaluate(SLICE);
    await drag(page, [centre[0] - 50, centre[1] - 40], [centre[0] + 70, centre[1] + 60]);
    await segvol(page, 'prompts').locator(`button[data-tool="SegVolNegativePoint"]`).click();
    await page.mouse.click(centre[0] + 30, centre[1] + 20);
    await page.waitForTimeout(800);
    return { suggestions, chips, slices: [first, second], box_text: await segvol(page, 'box').innerText(),
      points_text: await segvol(page, 'points').innerText(), screenshot: await shot(page, 'prompts') };
  });

  const runSegVol = async name => {
    const before = await page.evaluate(LABELMAP_STATS);
    const since = await page.evaluate(() => Date.now());
    const requestSeen = page.waitForRequest(r => r.url().includes('/infer/segvol?') && r.method() === 'POST',
      { timeout: 30000 }).catch(() => null);
    const responseSeen = page.waitForResponse(r => r.url().includes('/infer/segvol?'), { timeout: cfg.timeout_s * 1000 })
      .catch(() => null);
    await segvol(page, 'run').click();
    const request = await requestSeen;
    if (!request) throw new Error('clicking Run SegVol sent no request');
    const response = await responseSeen;
    if (!response) throw new Error('no answer to the SegVol request');
    const outcome = await panelOutcome(page, since, cfg.timeout_s * 1000);
    if (outcome.kind !== 'success') throw new Error(`SegVol run: ${outcome.text}`);
    await page.waitForTimeout(1500);
    return { params: formParams(request), url: request.url(), status: response.status(), outcome,
      latency: await segvol(page, 'latency').innerText(), before,
      segments: await segvol(page, 'segments').locator('tr[data-segment]').evaluateAll(n => n.map(e => e.innerText)),
      stats: await page.evaluate(LABELMAP_STATS), screenshot: await shot(page, name) };
  };

  await step('run SegVol: text + box + points in one request', async () => runSegVol('segvol'));

  await step('add a positive click and run SegVol again (the image is cached)', async () => {
    await segvol(page, 'prompts').locator(`button[data-tool="SegVolPositivePoint"]`).click();
    await page.mouse.click(centre[0] - 10, centre[1] - 5);
    await page.waitForTimeout(500);
    return runSegVol('segvol-again');
  });

  await step('correct with the brush and the eraser (segmentation panel)', async () => {
    // the segment to paint: chosen in the SegVol panel's segment list
    await segvol(page, 'segments').locator(`button[data-select="${cfg.paint_label}"]`).click();
    await panelTab(page, 'panelSegmentationWithTools').click();
    const before = await page.evaluate(LABELMAP_STATS);
    const sliceBefore = await page.evaluate(SLICE);
    await page.locator('[data-cy="Brush"]').first().click();
    await page.waitForTimeout(500);
    await drag(page, [centre[0] - 60, centre[1] - 30], [centre[0] + 60, centre[1] + 10], 20);
    await page.waitForTimeout(1000);
    const painted = await page.evaluate(LABELMAP_STATS);
    const brushShot = await shot(page, 'brushed');
    await page.locator('[data-cy="Eraser"]').first().click();
    await page.waitForTimeout(500);
    await drag(page, [centre[0] + 40, centre[1] - 40], [centre[0] + 40, centre[1] + 40], 10);
    await page.waitForTimeout(1000);
    return { before, painted, stats: await page.evaluate(LABELMAP_STATS), slice: sliceBefore,
      segment_index: await page.evaluate(SEGMENT_INDEX, cfg.paint_label), brush_screenshot: brushShot,
      screenshot: await shot(page, 'erased') };
  });

  // ---- many structures on one labelmap, every prompt type, live, undoable (issue 25): clicks and keys only ----
  const count = async label => {
    const stats = await page.evaluate(LABELMAP_STATS);
    const found = stats && stats.segments.find(s => s.label === label);
    return found ? found.total : 0;
  };
  // Wait for the panel's next outcome after ``since`` and for the labelmap to settle.
  const settled = async since => {
    const outcome = await panelOutcome(page, since, cfg.timeout_s * 1000);
    await page.waitForTimeout(800);
    return outcome;
  };
  const addName = async name => {
    await segvol(page, 'text').click();
    await segvol(page, 'text').type(name, { delay: 20 });
    await page.keyboard.press('Enter');
  };
  const freehand = async (points, steps = 4) => {
    await page.mouse.move(points[0][0], points[0][1]);
    await page.mouse.down();
    for (let n = 1; n < points.length; n++) {
      for (let s = 1; s <= steps; s++) {
        await page.mouse.move(points[n - 1][0] + (points[n][0] - points[n - 1][0]) * s / steps,
          points[n - 1][1] + (points[n][1] - points[n - 1][1]) * s / steps);
      }
    }
    await page.mouse.up();
  };

  await step('lock a segment, replace mode: a second structure overlapping it leaves it unchanged', async () => {
    await panelTab(page, 'segvol').click();
    await segvol(page, 'prompts').getByRole('button', { name: 'Clear names' }).click();
    await segvol(page, 'prompts').getByRole('button', { name: 'Clear points' }).click();
    await segvol(page, 'segments').locator(`input[data-lock="${cfg.text_label}"]`).check();
    await segvol(page, 'rule').selectOption('replace');
    await addName(cfg.second_label);
    const locked = await count(cfg.text_label);
    const secondBefore = await count(cfg.second_label);
    const run = await runSegVol('locked');
    return { ...run, locked_before: locked, locked_after: await count(cfg.text_label), second_before: secondBefore,
      second_after: await count(cfg.second_label) };
  });

  await step('undo and redo the last result of a segment', async () => {
    const before = await count(cfg.second_label);
    await segvol(page, 'segments').locator(`button[data-undo="${cfg.second_label}"]`).click();
    await page.waitForTimeout(800);
    const undone = await count(cfg.second_label);
    await segvol(page, 'segments').locator(`button[data-redo="${cfg.second_label}"]`).click();
    await page.waitForTimeout(800);
    return { before, undone, redone: await count(cfg.second_label), locked: await count(cfg.text_label),
      screenshot: await shot(page, 'undo-redo') };
  });

  await step('live mode: each click runs SegVol at once', async () => {
    await segvol(page, 'live').check();
    await segvol(page, 'prompts').locator(`button[data-tool="SegVolPositivePoint"]`).click();
    const rounds = [];
    const requests = [];
    page.on('request', r => { if (r.url().includes('/infer/segvol?') && r.method() === 'POST') requests.push(r); });
    for (const [dx, dy] of [[-20, -10], [10, 15], [25, -20], [-5, 25], [15, 5]]) {
      const since = await page.evaluate(() => Date.now());
      const t0 = Date.now();
      await page.mouse.click(centre[0] + dx, centre[1] + dy);
      const outcome = await settled(since);
      if (outcome.kind !== 'success') throw new Error(`live run: ${outcome.text}`);
      rounds.push({ click_to_result_s: (Date.now() - t0 - 800) / 1000,
        round_trip_s: Number(await segvol(page, 'latency').getAttribute('data-round-trip')) });
    }
    return { rounds, requests: requests.length, second: await count(cfg.second_label),
      screenshot: await shot(page, 'live') };
  });

  await step('a positive lasso and a negative scribble each change the segment (live)', async () => {
    const lassoRequest = page.waitForRequest(r => r.url().includes('/infer/segvol?') && r.method() === 'POST',
      { timeout: 60000 }).catch(() => null);
    const beforeLasso = await count(cfg.second_label);
    await segvol(page, 'prompts').locator(`button[data-tool="SegVolLassoPositive"]`).click();
    let since = await page.evaluate(() => Date.now());
    // away from the box's rectangle and the clicks (a press on an annotation would move it instead of drawing)
    const r = 22;
    const loop = Array.from({ length: 13 }, (_, n) => [centre[0] - 60 + r * Math.cos(n * Math.PI / 6),
      centre[1] + 95 + r * Math.sin(n * Math.PI / 6)]);
    await freehand(loop);
    const lassoOutcome = await settled(since);
    const lasso = await lassoRequest;
    const afterLasso = await count(cfg.second_label);
    const freehandText = await segvol(page, 'freehand').innerText().catch(() => '');
    const scribbleRequest = page.waitForRequest(r => r.url().includes('/infer/segvol?') && r.method() === 'POST',
      { timeout: 60000 }).catch(() => null);
    await segvol(page, 'prompts').locator(`button[data-tool="SegVolScribbleNegative"]`).click();
    since = await page.evaluate(() => Date.now());
    await freehand([[centre[0] - 80, centre[1] - 90], [centre[0] - 50, centre[1] - 75], [centre[0] - 20, centre[1] - 95],
      [centre[0] + 10, centre[1] - 80]]);
    const scribbleOutcome = await settled(since);
    const scribble = await scribbleRequest;
    return { before_lasso: beforeLasso, after_lasso: afterLasso, after_scribble: await count(cfg.second_label),
      lasso_outcome: lassoOutcome, scribble_outcome: scribbleOutcome, freehand_text: freehandText,
      lasso_params: lasso ? formParams(lasso) : null, scribble_params: scribble ? formParams(scribble) : null,
      screenshot: await shot(page, 'lasso-scribble') };
  });

  await step('refine an existing segment: its prompts are kept and a click is added', async () => {
    await segvol(page, 'live').uncheck();
    await segvol(page, 'clear-freehand').click();
    await segvol(page, 'prompts').getByRole('button', { name: 'Clear points' }).click();
    await segvol(page, 'segments').locator(`button[data-refine="${cfg.free_text}"]`).click();
    const banner = await segvol(page, 'refining').innerText();
    await segvol(page, 'prompts').locator(`button[data-tool="SegVolPositivePoint"]`).click();
    await page.mouse.click(centre[0] + 5, centre[1] - 5);
    await page.waitForTimeout(500);
    const run = await runSegVol('refined');
    await segvol(page, 'segments').locator(`button[data-refine="${cfg.free_text}"]`).click(); // refining off
    // a segment SegVol did not make (the MONAI Label panel's class prompt): its box and points inside it
    await segvol(page, 'prompts').getByRole('button', { name: 'Clear points' }).click();
    await segvol(page, 'segments').locator(`button[data-refine="${cfg.class_label}"]`).click();
    const madeElsewhere = await runSegVol('refined-existing');
    await segvol(page, 'segments').locator(`button[data-refine="${cfg.class_label}"]`).click();
    await segvol(page, 'segments').locator(`input[data-lock="${cfg.text_label}"]`).uncheck();
    await segvol(page, 'rule').selectOption('empty');
    return { ...run, banner, existing: { params: madeElsewhere.params, outcome: madeElsewhere.outcome } };
  });

  await step('save while the server fails: error shown, nothing lost', async () => {
    await panelTab(page, 'segvol').click();
    let puts = 0;
    await page.route('**/datastore/label?**', route => {
      if (route.request().method() !== 'PUT') return route.continue();
      puts++;
      return route.fulfill({ status: 502, contentType: 'application/json',
        body: JSON.stringify({ detail: 'PACS unavailable (simulated by the e2e test)' }) });
    });
    const before = await page.evaluate(LABELMAP_STATS);
    const since = await page.evaluate(() => Date.now());
    await segvol(page, 'save').click();
    const outcome = await panelOutcome(page, since, 60000);
    const screenshot = await shot(page, 'save-failed');
    await page.unroute('**/datastore/label?**');
    const after = await page.evaluate(LABELMAP_STATS);
    return { puts, outcome, before, stats: after, screenshot };
  });

  await step('save to SegVol Label (one button)', async () => {
    const before = await page.evaluate(LABELMAP_STATS);
    const beforeShot = await shot(page, 'before-save');
    const since = await page.evaluate(() => Date.now());
    const requestSeen = page.waitForRequest(r => r.url().includes('/datastore/label?') && r.method() === 'PUT')
      .catch(() => null);
    const responseSeen = page.waitForResponse(r => r.url().includes('/datastore/label?') && r.request().method() === 'PUT',
      { timeout: 300000 }).catch(() => null);
    await segvol(page, 'save').click();
    const request = await requestSeen;
    const response = await responseSeen;
    if (!request || !response) throw new Error('clicking Save to SegVol Label sent no request or got no answer');
    const outcome = await panelOutcome(page, since, 300000);
    await page.waitForTimeout(2000);
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    return { params: formParams(request), status: response.status(), response: body, outcome, before,
      stats: await page.evaluate(LABELMAP_STATS), saved_text: await segvol(page, 'saved').innerText(),
      retrain_text: await segvol(page, 'retrain').innerText(), before_screenshot: beforeShot,
      screenshot: await shot(page, 'saved') };
  });

  await step('update the model (MONAI Label panel) and follow the run in the SegVol panel', async () => {
    // the stock MONAI Label panel's "Update Model" (Active Learning tab) starts a run of every trainer with the
    // server's defaults (here --conf train_epochs 1: a short run); the SegVol panel shows its status from /info
    await panelTab(page, 'monailabel').click();
    const activeLearning = page.locator('label.tab-label', { hasText: 'Active Learning' });
    await page.waitForTimeout(500);
    if (!(await activeLearning.count())) {
      // the panel mounts afresh when its tab is shown again: connect it (its refresh button) as the annotator would
      const connecting = await page.evaluate(() => Date.now());
      await page.locator('table.settingsTable button.actionButton').first().click();
      const seen = await waitForMessage(page, connecting, ['Connected to MONAI Label - Successful',
        'Failed to Connect to MONAI Label'], 60000);
      if (seen !== 'Connected to MONAI Label - Successful') throw new Error(seen);
      await activeLearning.waitFor({ timeout: 30000 });
    }
    const update = page.getByRole('button', { name: 'Update Model', exact: true });
    if (!(await update.isVisible())) await activeLearning.click();
    await update.waitFor({ state: 'visible', timeout: 30000 });
    const isTrain = r => r.method() === 'POST' && /\/train\/?$/.test(new URL(r.url()).pathname);
    const requestSeen = page.waitForRequest(isTrain, { timeout: 30000 }).catch(() => null);
    const responseSeen = page.waitForResponse(r => isTrain(r.request()), { timeout: 60000 }).catch(() => null);
    const since = await page.evaluate(() => Date.now());
    await update.click();
    const request = await requestSeen;
    const response = await responseSeen;
    if (!request || !response) throw new Error('clicking Update Model sent no train request or got no answer');
    const notice = await waitForMessage(page, since, ['Model update task STARTED', 'Failed to RUN training'], 60000);
    if (notice !== 'Model update task STARTED') throw new Error(`${notice} (HTTP ${response.status()})`);
    const started = await shot(page, 'train-started');

    await panelTab(page, 'segvol').click();
    const training = segvol(page, 'training').first();
    const FINAL = ['FINISHED', 'BUDGET', 'STOPPED', 'ERROR', 'FAILED', 'DONE'];
    const timeline = [];
    let running = null;
    let final = null;
    const deadline = Date.now() + (cfg.train_timeout_s || 180) * 1000;
    while (!final && Date.now() < deadline) {
      if (await training.count()) {
        const status = await training.getAttribute('data-status').catch(() => null);
        const text = await training.innerText().catch(() => null);
        if (status && text && (!timeline.length || timeline[timeline.length - 1].text !== text)) {
          timeline.push({ t: Number(elapsed().toFixed(1)), status, text });
          if (status === 'RUNNING' && !running) {
            const panel = path.join(ART, `${cfg.phase}-training-running-status.png`);
            const panelError = await elementShot(page, segvol(page, 'status'), panel); // scrolls the panel to it
            running = { text, screenshot: await shot(page, 'training-running'), panel_screenshot: panel, panelError };
          }
        }
        // a final status counts once this run was seen (the row showed the previous state before the click)
        if (FINAL.includes(status) && timeline.some(e => e.status === 'STARTING' || e.status === 'RUNNING')) {
          final = { status, text };
        }
      }
      if (!final) await page.waitForTimeout(400);
    }
    if (!final) throw new Error(`no final training status within ${cfg.train_timeout_s || 180} s: ${JSON.stringify(timeline)}`);
    const panelShot = path.join(ART, `${cfg.phase}-training-status.png`);
    const finalError = await elementShot(page, segvol(page, 'status'), panelShot);
    if (finalError) throw new Error(`no picture of the panel's final training status: ${finalError}`);
    return { url: request.url(), body: request.postData(), status: response.status(),
      response: await response.json().catch(() => null), notice, timeline, running, final,
      model: await segvol(page, 'model').innerText(), started_screenshot: started, panel_screenshot: panelShot,
      screenshot: await shot(page, 'trained') };
  });

  await step('next sample', async () => {
    const since = await page.evaluate(() => Date.now());
    const responseSeen = page.waitForResponse(r => r.url().includes('/activelearning/'), { timeout: 120000 })
      .catch(() => null);
    await segvol(page, 'next').click();
    const response = await responseSeen;
    if (!response) throw new Error('clicking Next sample asked the server nothing');
    const status = response.status();
    // the panel opens the study of the next sample (the page navigates: the answer is read from the new address)
    await page.waitForURL(url => !url.toString().includes(cfg.study), { timeout: 60000 });
    const study = new URL(page.url()).searchParams.get('StudyInstanceUIDs');
    await waitForVolume(page);
    await page.waitForTimeout(2000);
    const series = await page.evaluate(() => window.services.displaySetService.getActiveDisplaySets()
      .map(d => ({ modality: d.Modality, series: d.SeriesInstanceUID, study: d.StudyInstanceUID })));
    return { status, study, url: page.url(), series, since, screenshot: await shot(page, 'next') };
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
    const status = {};
    for (const what of ['model', 'training', 'retrain', 'datastore']) {
      const node = page.locator(`[data-segvol="${what}"]`);
      status[what] = (await node.count()) ? await node.first().innerText() : null;
    }
    return { series, status, screenshot: await shot(page, 'reopened') };
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
