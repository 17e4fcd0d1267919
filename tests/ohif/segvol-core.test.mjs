// Unit tests of the OHIF extension's pure functions (apps/segvol/ohif/segvol-core.js): `node --test tests/ohif`.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  ResultHistory, applyDiff, boxOfCorners, clampIndex, colorOf, diffLabels, insidePolygon, lassoPrompts, maskPrompts,
  mergeResult, negativeEvidence, parseNrrd, restrictDiff, strokePoints, suggestions, trainingStatus, vocabularyOf,
  voxelCounts, voxelOf,
} from '../../apps/segvol/ohif/segvol-core.js';

function nrrd(header, voxels) {
  const head = new TextEncoder().encode(`${header}\n\n`);
  const out = new Uint8Array(head.length + voxels.length);
  out.set(head);
  out.set(voxels, head.length);
  return out.buffer;
}

test('a raw uint8 NRRD gives its sizes and voxels', () => {
  const voxels = Uint8Array.from({ length: 24 }, (_, i) => i % 3);
  const header = 'NRRD0004\n# a comment: ignored\ntype: uint8\ndimension: 3\nsizes: 2 3 4\nencoding: raw\nspace:=RAS';
  const { sizes, data } = parseNrrd(nrrd(header, voxels));
  assert.deepEqual(sizes, [2, 3, 4]);
  assert.deepEqual([...data], [...voxels]);
});

test('a NRRD the panel cannot use is refused with the reason', () => {
  const voxels = new Uint8Array(8);
  assert.throws(() => parseNrrd(new Uint8Array([1, 2, 3]).buffer), /not a NRRD/);
  assert.throws(() => parseNrrd(nrrd('type: uint8\nsizes: 2 2 2\nencoding: gzip', voxels)), /encoding gzip/);
  assert.throws(() => parseNrrd(nrrd('type: short\nsizes: 2 2 2\nencoding: raw', voxels)), /type short/);
  assert.throws(() => parseNrrd(nrrd('type: uint8\nsizes: 2 2 3\nencoding: raw', voxels)), /holds 8 voxels.*says 12/);
});

test('rectangle corners give the box spanning them, clamped into the volume', () => {
  const dims = [10, 20, 5];
  assert.deepEqual(clampIndex([-3.2, 7.6, 9.9], dims), [0, 8, 4]);
  const corners = [[2, 3, 1], [6, 9, 1], [4, 5, 3], [3, 12, 3]];
  assert.deepEqual(boxOfCorners(corners), [2, 3, 1, 6, 12, 3]);
  assert.equal(boxOfCorners([]), null);
  // brute force: every corner inside, every face touched
  const box = boxOfCorners(corners);
  for (const c of corners) for (let a = 0; a < 3; a++) assert.ok(box[a] <= c[a] && c[a] <= box[a + 3]);
  for (let a = 0; a < 3; a++) {
    assert.ok(corners.some(c => c[a] === box[a]) && corners.some(c => c[a] === box[a + 3]));
  }
});

test('a result replaces its segments and keeps the others', () => {
  // labelmap: segment 1 (liver, from an earlier run), segment 2 (spleen, brushed); result: value 1 -> liver again
  const current = Uint8Array.from([1, 1, 2, 2, 0, 0, 1, 0]);
  const result = Uint8Array.from([0, 1, 1, 0, 1, 0, 0, 3]);
  const { labels, counts } = mergeResult(current, result, { 1: 1 });
  assert.deepEqual([...labels], [0, 1, 2, 2, 1, 0, 0, 0]); // old liver cleared, spleen kept, value 3 not mapped
  assert.deepEqual(counts, { 1: 2 });
  assert.deepEqual([...current], [1, 1, 2, 2, 0, 0, 1, 0]); // the input is not changed
  // two names into two segments, one of them new
  const two = mergeResult(current, Uint8Array.from([2, 2, 0, 0, 1, 1, 0, 0]), { 1: 3, 2: 1 });
  assert.deepEqual([...two.labels], [1, 1, 2, 2, 3, 3, 0, 0]);
  assert.deepEqual(two.counts, { 1: 2, 3: 2 });
  assert.throws(() => mergeResult(current, new Uint8Array(3), { 1: 1 }), /not the same grid/);
});

test('voxel counts per value', () => {
  assert.deepEqual(voxelCounts(Uint8Array.from([0, 3, 3, 1, 255])), { 1: 1, 3: 2, 255: 1 });
});

test('suggestions: names starting with the text first, then names containing it', () => {
  const vocabulary = ['aorta', 'kidney left', 'kidney right', 'liver', 'left lung'];
  assert.deepEqual(suggestions(vocabulary, 'LEF'), ['left lung', 'kidney left']);
  assert.deepEqual(suggestions(vocabulary, '  '), []);
  assert.equal(suggestions(vocabulary, 'e', 2).length, 2);
});

test('training status: STARTING until the requested run is seen RUNNING, then its own final status', () => {
  const previous = { status: 'FINISHED', epoch: 1, total_epochs: 1 };
  const task = { id: 't2', status: 'RUNNING' };
  assert.equal(trainingStatus(previous, task, false), 'STARTING');
  assert.equal(trainingStatus({ ...previous, status: 'RUNNING' }, task, false), 'RUNNING');
  assert.equal(trainingStatus(previous, task, true), 'FINISHED'); // seen running: this is the new run's end
  assert.equal(trainingStatus(previous, { id: 't2', status: 'DONE' }, false), 'FINISHED');
  assert.equal(trainingStatus({}, null, false), 'never run');
  assert.equal(trainingStatus({ task: { status: 'ERROR' } }, null, false), 'ERROR');
});

test('the vocabulary joins the app labels and the segvol model labels', () => {
  const info = { labels: ['liver', 'spleen'], models: { segvol: { labels: { aorta: 3, liver: 1 } } } };
  assert.deepEqual(vocabularyOf(info), ['aorta', 'liver', 'spleen']);
  assert.deepEqual(vocabularyOf({ labels: { b: 2, a: 1 } }), ['a', 'b']);
});

test('segment colours are stable and opaque', () => {
  assert.deepEqual(colorOf('liver'), colorOf('liver'));
  assert.equal(colorOf('spleen').length, 4);
  assert.equal(colorOf('spleen')[3], 255);
});

test('locked segments never change, whatever the rule', () => {
  // 1 liver (locked), 2 spleen; the result's value 1 goes to segment 2 and overlaps both
  const current = Uint8Array.from([1, 1, 2, 0, 0, 2]);
  const result = Uint8Array.from([1, 1, 1, 1, 0, 0]);
  for (const rule of ['replace', 'empty']) {
    const { labels, counts } = mergeResult(current, result, { 1: 2 }, { locked: [1], rule });
    assert.deepEqual([...labels], [1, 1, 2, 2, 0, 0], rule); // liver's voxels kept, spleen's old voxel 5 cleared
    assert.deepEqual(counts, { 2: 2 });
  }
  // a result aimed at a locked segment changes nothing
  const aimed = mergeResult(current, result, { 1: 1 }, { locked: [1], rule: 'replace' });
  assert.deepEqual([...aimed.labels], [...current]);
  assert.throws(() => mergeResult(current, result, { 1: 2 }, { rule: 'paint' }), /unknown overwrite rule/);
});

test('replace overwrites unlocked segments, empty fills only empty voxels', () => {
  const current = Uint8Array.from([3, 3, 0, 1]);
  const result = Uint8Array.from([1, 1, 1, 0]);
  assert.deepEqual([...mergeResult(current, result, { 1: 1 }, { rule: 'replace' }).labels], [1, 1, 1, 0]);
  assert.deepEqual([...mergeResult(current, result, { 1: 1 }, { rule: 'empty' }).labels], [3, 3, 1, 0]);
});

test('undo restores the exact labelmap before a result, redo repeats it, per segment', () => {
  const history = new ResultHistory();
  const start = Uint8Array.from([0, 1, 1, 0, 2, 0]);
  const afterLiver = Uint8Array.from([1, 1, 0, 0, 2, 0]);
  history.record('liver', diffLabels(start, afterLiver));
  const afterSpleen = Uint8Array.from([1, 1, 0, 2, 2, 2]);
  history.record('spleen', diffLabels(afterLiver, afterSpleen));
  const undoneLiver = history.undo('liver', afterSpleen);
  assert.deepEqual([...undoneLiver], [0, 1, 1, 2, 2, 2]); // the spleen's step stays
  assert.equal(history.canUndo('liver'), false);
  assert.deepEqual([...history.redo('liver', undoneLiver)], [...afterSpleen]);
  assert.equal(history.redo('liver', afterSpleen), null);
  assert.deepEqual([...applyDiff(afterSpleen, diffLabels(start, afterSpleen), true)], [...start]);
  history.undo('spleen', afterSpleen);
  history.record('spleen', diffLabels(afterLiver, afterLiver)); // a new result clears the segment's redo
  assert.equal(history.canRedo('spleen'), false);
});

test('an existing segment gives its box and points inside it', () => {
  const dims = [4, 3, 2];
  const labels = new Uint8Array(24);
  for (const [i, j, k] of [[1, 0, 0], [2, 1, 0], [1, 1, 1], [3, 2, 1]]) labels[i + j * 4 + k * 12] = 5;
  const { box, positive } = maskPrompts(labels, dims, 5, 3);
  assert.deepEqual(box, [1, 0, 0, 3, 2, 1]);
  assert.ok(positive.length >= 1);
  for (const p of positive) assert.equal(labels[p[0] + p[1] * 4 + p[2] * 12], 5);
  assert.equal(maskPrompts(labels, dims, 7), null);
  assert.deepEqual(voxelOf(1 + 2 * 4 + 1 * 12, dims), [1, 2, 1]);
});

test('a lasso gives the box of its contour and points inside it', () => {
  const square = [[10, 10, 4], [20, 10, 4], [20, 20, 4], [10, 20, 4]];
  assert.ok(insidePolygon([15, 15], square.map(p => p.slice(0, 2))));
  assert.ok(!insidePolygon([25, 15], square.map(p => p.slice(0, 2))));
  const positive = lassoPrompts(square, true, 3);
  assert.deepEqual(positive.box, [10, 10, 4, 20, 20, 4]);
  assert.equal(positive.points.length, 3);
  for (const p of positive.points) assert.ok(p[0] >= 10 && p[0] <= 20 && p[1] >= 10 && p[1] <= 20 && p[2] === 4);
  // an L-shaped lasso: no point in its notch
  const ell = [[0, 0, 1], [10, 0, 1], [10, 4, 1], [4, 4, 1], [4, 10, 1], [0, 10, 1]];
  for (const p of lassoPrompts(ell, false, 5).points) assert.ok(!(p[0] > 4 && p[1] > 4), `${p}`);
  assert.equal(lassoPrompts(ell, false).box, null);
  assert.deepEqual(lassoPrompts(ell.slice(0, 2), true), { box: null, points: [] });
});

test('a scribble gives distinct points spread along it', () => {
  const stroke = Array.from({ length: 20 }, (_, n) => [n, 5, 2]).concat([[19, 5, 2]]);
  const points = strokePoints(stroke, 5);
  assert.deepEqual(points, [[0, 5, 2], [5, 5, 2], [10, 5, 2], [14, 5, 2], [19, 5, 2]]);
  assert.deepEqual(strokePoints([[1, 1, 1], [1, 1, 1]], 5), [[1, 1, 1]]);
});

test('other segments inside the box become negative points', () => {
  const dims = [5, 5, 1];
  const labels = new Uint8Array(25);
  labels[1 + 1 * 5] = 2; // inside the box
  labels[4 + 4 * 5] = 2; // outside it
  labels[2 + 2 * 5] = 3; // another segment, not asked for
  assert.deepEqual(negativeEvidence(labels, dims, [2], [0, 0, 0, 2, 2, 0], 3), [[1, 1, 0]]);
  assert.deepEqual(negativeEvidence(labels, dims, [2], null, 3), [[1, 1, 0], [4, 4, 0]]);
});

test('a result touching two segments is undone per segment', () => {
  const before = Uint8Array.from([0, 1, 2, 0]);
  const after = Uint8Array.from([3, 1, 3, 4]);
  const diff = diffLabels(before, after);
  const three = restrictDiff(diff, 3);
  assert.deepEqual([...three.indices], [0, 2]);
  assert.deepEqual([...applyDiff(after, three, true)], [0, 1, 2, 4]);
  assert.deepEqual([...restrictDiff(diff, 1).indices], []);
});
