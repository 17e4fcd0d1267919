/*
 * SegVol Label's OHIF extension: what it reads from and does to the viewer (OHIF's services and commands, cornerstone
 * and cornerstone tools as @ohif/extension-cornerstone exposes them): the series on screen, the labelmap
 * (OHIF segmentation '1', the one the MONAI Label panel fills), the prompt tools and their annotations.
 */

import { boxOfCorners, clampIndex, colorOf, lassoPrompts, strokePoints, voxelCounts } from './segvol-core.js';

export const SEGMENTATION_ID = '1';
export const POSITIVE_TOOL = 'SegVolPositivePoint';
export const NEGATIVE_TOOL = 'SegVolNegativePoint';
export const BOX_TOOL = 'RectangleROI';
// freehand contours (cornerstone's PlanarFreehandROI): a lasso is a closed contour on one slice, a scribble a stroke
export const LASSO_POSITIVE = 'SegVolLassoPositive';
export const LASSO_NEGATIVE = 'SegVolLassoNegative';
export const SCRIBBLE_POSITIVE = 'SegVolScribblePositive';
export const SCRIBBLE_NEGATIVE = 'SegVolScribbleNegative';
const FREEHAND_TOOLS = [LASSO_POSITIVE, LASSO_NEGATIVE, SCRIBBLE_POSITIVE, SCRIBBLE_NEGATIVE];
export const PROMPT_TOOLS = [POSITIVE_TOOL, NEGATIVE_TOOL, BOX_TOOL, ...FREEHAND_TOOLS];

export class SegVolViewer {
  constructor({ servicesManager, commandsManager, extensionManager }) {
    this.services = servicesManager.services;
    this.commands = commandsManager;
    this.extensions = extensionManager;
    this.unsubscribe = []; // what listen() registered, undone by close()
  }

  libraries() {
    try {
      const entry = this.extensions.getModuleEntry('@ohif/extension-cornerstone.utilityModule.common');
      const libs = entry.exports.getCornerstoneLibraries();
      if (libs && libs.cornerstone && libs.cornerstoneTools) return libs;
    } catch (e) { /* fall back to the globals the cornerstone extension sets */ }
    return { cornerstone: window.cornerstone, cornerstoneTools: window.cornerstoneTools };
  }

  activeViewportId() {
    return this.services.viewportGridService.getActiveViewportId();
  }

  /** The image series (not a SEG) in the active viewport, or null. */
  activeDisplaySet() {
    const { viewportGridService, displaySetService } = this.services;
    const { viewports, activeViewportId } = viewportGridService.getState();
    const viewport = viewports.get(activeViewportId);
    if (!viewport || !viewport.displaySetInstanceUIDs || !viewport.displaySetInstanceUIDs.length) return null;
    for (const uid of viewport.displaySetInstanceUIDs) {
      const displaySet = displaySetService.getDisplaySetByUID(uid);
      if (displaySet && displaySet.Modality !== 'SEG') return displaySet;
    }
    return null;
  }

  /** The image volume on screen (the CT, not the labelmap) in the active viewport. */
  imageVolume() {
    const { cornerstone } = this.libraries();
    const viewport = this.services.cornerstoneViewportService.getCornerstoneViewport(this.activeViewportId());
    const ids = [];
    if (viewport && viewport.getVolumeId) ids.push(viewport.getVolumeId());
    if (viewport && viewport.getActors) {
      for (const actor of viewport.getActors()) ids.push(actor.referencedId || actor.uid);
    }
    for (const id of ids) {
      const volume = id && cornerstone.cache.getVolume(id);
      if (volume && volume.imageData && id !== SEGMENTATION_ID) return volume;
    }
    return null;
  }

  labelmap() {
    try {
      if (!this.services.segmentationService.getSegmentation(SEGMENTATION_ID)) return null;
      return this.services.segmentationService.getLabelmapVolume(SEGMENTATION_ID) || null;
    } catch (e) {
      return null; // no such segmentation (yet)
    }
  }

  /** The labelmap's voxels, or null. */
  labels() {
    const volume = this.labelmap();
    return volume ? volume.voxelManager.getCompleteScalarDataArray() : null;
  }

  setLabels(labels) {
    this.labelmap().voxelManager.setCompleteScalarDataArray(labels);
    const { cornerstone, cornerstoneTools } = this.libraries();
    cornerstone.triggerEvent(cornerstone.eventTarget, cornerstoneTools.Enums.Events.SEGMENTATION_DATA_MODIFIED,
      { segmentationId: SEGMENTATION_ID });
  }

  segments() {
    try {
      const segmentation = this.services.segmentationService.getSegmentation(SEGMENTATION_ID);
      return (segmentation && segmentation.segments) || {};
    } catch (e) {
      return {};
    }
  }

  /** Voxels per segment index of the labelmap. */
  presentSegments() {
    const labels = this.labels();
    return labels ? voxelCounts(labels) : {};
  }

  segmentIndexOf(name) {
    for (const [index, segment] of Object.entries(this.segments())) {
      if (segment && segment.label === name) return Number(index);
    }
    return null;
  }

  segmentColor(index) {
    try {
      const color = this.services.segmentationService.getSegmentColor(this.activeViewportId(), SEGMENTATION_ID, index);
      return color && color.length >= 3 ? Array.from(color).slice(0, 3).map(Number) : null;
    } catch (e) {
      return null;
    }
  }

  setActiveSegment(index) {
    this.services.segmentationService.setActiveSegment(SEGMENTATION_ID, index);
  }

  /** Segmentation '1' as the MONAI Label panel creates it (every served name a segment, sorted). */
  async ensureSegmentation(names) {
    if (this.labelmap()) return;
    const { cornerstone } = this.libraries();
    if (cornerstone.cache.getVolume(SEGMENTATION_ID)) return;
    const segments = {};
    (names.length ? names : ['object']).forEach((label, n) => {
      segments[n + 1] = { segmentIndex: n + 1, label, active: n === 0, locked: false, color: colorOf(label) };
    });
    await this.commands.runCommand('loadSegmentationsForViewport', {
      segmentations: [{ segmentationId: SEGMENTATION_ID, representation: { type: 'Labelmap' },
        config: { label: 'Segmentations', segments } }],
    });
    for (let i = 0; i < 50 && !this.labelmap(); i++) await new Promise(resolve => setTimeout(resolve, 100));
  }

  /** The index of the segment named `name`, added when there is none. */
  ensureSegment(name) {
    let index = this.segmentIndexOf(name);
    if (index) return index;
    index = Math.max(0, ...Object.keys(this.segments()).map(Number)) + 1;
    if (index > 255) throw new Error('no room for another segment (255 at most)');
    this.services.segmentationService.addSegment(SEGMENTATION_ID, { segmentIndex: index, label: name,
      color: colorOf(name) });
    return index;
  }

  /* ------------------------------------------------------------------------------------------- the prompt tools */

  registerTools() {
    const { cornerstoneTools } = this.libraries();
    if (!cornerstoneTools || !cornerstoneTools.ProbeTool) return;
    const tools = [pointTool(cornerstoneTools, POSITIVE_TOOL, 'rgb(0, 220, 90)'),
      pointTool(cornerstoneTools, NEGATIVE_TOOL, 'rgb(255, 60, 60)')];
    if (cornerstoneTools.PlanarFreehandROITool) {
      for (const name of FREEHAND_TOOLS) tools.push(freehandTool(cornerstoneTools, name));
    }
    for (const tool of tools) {
      try {
        cornerstoneTools.addTool(tool);
      } catch (e) {
        console.warn('SegVol: tool', tool.toolName, 'not registered:', e && e.message);
      }
    }
  }

  /** Our tools in every tool group of the mode, passive: they take the mouse only when the panel activates them. */
  addToolsToGroups() {
    const { toolGroupService } = this.services;
    for (const id of toolGroupService.getToolGroupIds ? toolGroupService.getToolGroupIds() : ['default', 'mpr']) {
      const group = toolGroupService.getToolGroup(id);
      if (!group || id === 'volume3d') continue;
      for (const name of PROMPT_TOOLS) {
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

  activateTool(toolName) {
    const group = this.services.toolGroupService.getToolGroupForViewport(this.activeViewportId());
    if (!group) return;
    const current = group.getActivePrimaryMouseButtonTool();
    if (current === toolName) return;
    if (current) group.setToolPassive(current);
    group.setToolActive(toolName, { bindings: [{ mouseButton: 1 }] });
  }

  promptAnnotations() {
    const { cornerstoneTools } = this.libraries();
    const all = cornerstoneTools.annotation.state.getAllAnnotations() || [];
    return all.filter(a => a && a.metadata && PROMPT_TOOLS.includes(a.metadata.toolName));
  }

  removeAnnotations(toolNames) {
    const { cornerstoneTools, cornerstone } = this.libraries();
    for (const item of this.promptAnnotations()) {
      if (toolNames.includes(item.metadata.toolName)) {
        cornerstoneTools.annotation.state.removeAnnotation(item.annotationUID);
      }
    }
    const engine = cornerstone.getRenderingEngines()[0];
    if (engine) engine.render();
  }

  /**
   * The annotations as voxel indices (i column, j row, k slice of the series as stored: what the server takes):
   * points, the box spanning the rectangles and positive lassos, the points inside lassos and along scribbles.
   */
  collectPrompts() {
    const volume = this.imageVolume();
    if (!volume) return { positive: [], negative: [], box: null, rectangles: 0, lassos: 0, scribbles: 0 };
    const toIndex = world => clampIndex(volume.imageData.worldToIndex(world), volume.dimensions);
    const positive = [];
    const negative = [];
    const corners = [];
    let rectangles = 0;
    let lassos = 0;
    let scribbles = 0;
    for (const item of this.promptAnnotations()) {
      const tool = item.metadata.toolName;
      if (FREEHAND_TOOLS.includes(tool)) {
        const contour = ((item.data && item.data.contour && item.data.contour.polyline) || []).map(toIndex);
        if (!contour.length) continue;
        const sign = tool === LASSO_POSITIVE || tool === SCRIBBLE_POSITIVE ? positive : negative;
        if (tool === LASSO_POSITIVE || tool === LASSO_NEGATIVE) {
          const lasso = lassoPrompts(contour, tool === LASSO_POSITIVE);
          sign.push(...lasso.points);
          if (lasso.box) corners.push(lasso.box.slice(0, 3), lasso.box.slice(3));
          lassos++;
        } else {
          sign.push(...strokePoints(contour));
          scribbles++;
        }
        continue;
      }
      const points = (item.data && item.data.handles && item.data.handles.points) || [];
      if (!points.length) continue;
      if (tool === POSITIVE_TOOL) positive.push(toIndex(points[0]));
      else if (tool === NEGATIVE_TOOL) negative.push(toIndex(points[0]));
      else {
        rectangles++;
        for (const p of points) corners.push(toIndex(p));
      }
    }
    return { positive, negative, box: boxOfCorners(corners), rectangles, lassos, scribbles };
  }

  dimensions() {
    const volume = this.labelmap();
    return volume ? volume.dimensions : null;
  }

  /** Call `onPrompts` when an annotation changes, `onEdit` at once and `onLabels` a moment later when the labelmap
   * does (the debounced ones redraw). */
  listen({ onPrompts, onCompleted, onEdit, onLabels }) {
    const { cornerstone, cornerstoneTools } = this.libraries();
    const events = cornerstoneTools.Enums.Events;
    const subscribe = (name, handler) => {
      if (!name) return;
      cornerstone.eventTarget.addEventListener(name, handler);
      this.unsubscribe.push(() => cornerstone.eventTarget.removeEventListener(name, handler));
    };
    const prompts = debounce(onPrompts);
    for (const name of [events.ANNOTATION_COMPLETED, events.ANNOTATION_REMOVED, events.ANNOTATION_MODIFIED]) {
      subscribe(name, prompts);
    }
    // a prompt placed (a click, a rectangle, a lasso or scribble finished): what live mode runs on
    const completed = debounce(onCompleted, 100);
    subscribe(events.ANNOTATION_COMPLETED, event => {
      const tool = event && event.detail && event.detail.annotation && event.detail.annotation.metadata
        && event.detail.annotation.metadata.toolName;
      if (PROMPT_TOOLS.includes(tool)) completed();
    });
    const labels = debounce(onLabels);
    subscribe(events.SEGMENTATION_DATA_MODIFIED, () => {
      onEdit();
      labels();
    });
  }

  close() {
    for (const undo of this.unsubscribe.splice(0)) {
      try { undo(); } catch (e) { /* already gone with the viewer */ }
    }
  }
}

function debounce(fn, ms = 300) {
  let pending = null;
  return () => {
    if (pending) return;
    pending = setTimeout(() => {
      pending = null;
      try { fn(); } catch (e) { console.warn('SegVol panel', e); }
    }, ms);
  };
}

// A freehand contour tool of its own name (a lasso or a scribble, positive or negative).
function freehandTool(cornerstoneTools, toolName) {
  class SegVolFreehandTool extends cornerstoneTools.PlanarFreehandROITool {}
  SegVolFreehandTool.toolName = toolName;
  return SegVolFreehandTool;
}

// A ProbeTool drawn as a dot in the prompt's colour, without statistics text.
function pointTool(cornerstoneTools, toolName, color) {
  const { drawing, annotation } = cornerstoneTools;

  class SegVolPointTool extends cornerstoneTools.ProbeTool {
    constructor(props = {}, defaults = { configuration: {} }) {
      super(props, defaults);
      this.renderAnnotation = (enabledElement, svgDrawingHelper) => {
        const { viewport } = enabledElement;
        let found = annotation.state.getAnnotations(this.getToolName(), viewport.element);
        if (!found || !found.length) return false;
        found = this.filterInteractableAnnotationsForElement(viewport.element, found);
        if (!found || !found.length) return false;
        for (const item of found) {
          const canvas = viewport.worldToCanvas(item.data.handles.points[0]);
          drawing.drawHandles(svgDrawingHelper, item.annotationUID, '0', [canvas], { color, handleRadius: 5,
            fill: color });
        }
        return true;
      };
    }
  }
  SegVolPointTool.toolName = toolName;
  return SegVolPointTool;
}
