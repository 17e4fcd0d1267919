/*
 * SegVol Label's MONAI Label mode (plain ES module, served at /ohif/segvol/segvol-mode.js, listed in app-config.js).
 *
 * It has the id of the MONAI Label mode shipped in the OHIF build of monailabel ('@ohif/mode-monai-label'; modes from
 * app-config.js load first and a later one with the same id is skipped), and is built on that mode: the shipped
 * mode is loaded by name and its definition reused, with
 *   - three tabs on the right: SegVol (segvol-extension.js), the MONAI Label panel, and OHIF's segmentation panel
 *     with its tools (brush, eraser, shapes; segment list: add, rename, show/hide);
 *   - the brush, eraser and shape buttons of that panel's toolbox (the shipped mode names the toolbox section but
 *     defines no buttons for it);
 *   - the SegVol prompt tools (points, box) added to the viewports' tool groups;
 *   - hotkeys for the SegVol commands (Shift+R run, Shift+S save, Shift+N next sample, Shift+B box, Shift+P / Shift+O
 *     positive / negative point, Shift+L live mode).
 */

const MODE_ID = '@ohif/mode-monai-label';
const SEGVOL_EXTENSION = '@segvol/extension-segvol';
const SEGVOL_PANEL = `${SEGVOL_EXTENSION}.panelModule.segvol`;
// the mode route imports each key of a mode's `extensions` by name: ours by its URL (the module app-config.js lists)
const SEGVOL_EXTENSION_URL = '/ohif/segvol/segvol-extension.js';
const SEGMENTATION_PANEL = '@ohif/extension-cornerstone.panelModule.panelSegmentationWithTools';

// The buttons of the segmentation panel's toolbox (section 'segmentationToolbox'): circle/sphere brush and eraser
// with a radius, and the shape scissors, all run by the cornerstone extension's commands on the active tool group.
function brushRadius(id, label, toolNames) {
  return { name: label, id, type: 'range', min: 0.5, max: 99.5, step: 0.5, value: 10,
    commands: { commandName: 'setBrushSize', commandOptions: { toolNames } } };
}

function shapeChoice(id, values) {
  return { name: 'Shape', id, type: 'radio', value: values[0][0], values: values.map(([value, label]) => ({ value, label })),
    commands: 'setToolActiveToolbar' };
}

const segmentationButtons = [
  {
    id: 'BrushTools',
    uiType: 'ohif.buttonGroup',
    props: {
      groupId: 'BrushTools',
      items: [
        {
          id: 'Brush', icon: 'icon-tool-brush', label: 'Brush',
          evaluate: { name: 'evaluate.cornerstone.segmentation', toolNames: ['CircularBrush', 'SphereBrush'],
            disabledText: 'Run SegVol or connect the MONAI Label panel first' },
          options: [brushRadius('brush-radius', 'Radius (mm)', ['CircularBrush', 'SphereBrush']),
            shapeChoice('brush-mode', [['CircularBrush', 'Circle'], ['SphereBrush', 'Sphere']])],
        },
        {
          id: 'Eraser', icon: 'icon-tool-eraser', label: 'Eraser',
          evaluate: { name: 'evaluate.cornerstone.segmentation', toolNames: ['CircularEraser', 'SphereEraser'] },
          options: [brushRadius('eraser-radius', 'Radius (mm)', ['CircularEraser', 'SphereEraser']),
            shapeChoice('eraser-mode', [['CircularEraser', 'Circle'], ['SphereEraser', 'Sphere']])],
        },
      ],
    },
  },
  {
    id: 'Shapes',
    uiType: 'ohif.radioGroup',
    props: {
      label: 'Shapes', icon: 'icon-tool-shape',
      evaluate: { name: 'evaluate.cornerstone.segmentation', toolNames: ['CircleScissor', 'SphereScissor', 'RectangleScissor'] },
      options: [shapeChoice('shape-mode', [['CircleScissor', 'Circle'], ['SphereScissor', 'Sphere'], ['RectangleScissor', 'Rectangle']])],
    },
  },
];

// The SegVol commands (segvol-extension.js) on keys OHIF's defaults leave free; the panel's buttons run the same ones.
const segvolHotkeys = [
  ['segvolRun', 'Run SegVol', 'shift+r'],
  ['segvolSave', 'Save to SegVol Label', 'shift+s'],
  ['segvolNextSample', 'Next sample', 'shift+n'],
  ['segvolBox', 'SegVol box tool', 'shift+b'],
  ['segvolPositivePoint', 'SegVol positive point', 'shift+p'],
  ['segvolNegativePoint', 'SegVol negative point', 'shift+o'],
  ['segvolToggleLive', 'SegVol live mode on/off', 'shift+l'],
].map(([commandName, label, key]) => ({ commandName, context: 'SEGVOL', label, keys: [key], isEditable: true }));

async function modeFactory({ modeConfiguration, loadModules }) {
  const [shipped] = await loadModules([MODE_ID]);
  const base = shipped.modeFactory ? await shipped.modeFactory({ modeConfiguration, loadModules }) : shipped;
  return {
    ...base,
    id: MODE_ID,
    displayName: 'SegVol Label',
    extensions: { ...(base.extensions || {}), [SEGVOL_EXTENSION_URL]: '^0.1.0' },
    hotkeys: [...(base.hotkeys || []), ...segvolHotkeys],
    onModeEnter(args) {
      base.onModeEnter(args);
      const { servicesManager, extensionManager } = args;
      const { toolbarService } = servicesManager.services;
      toolbarService.addButtons(segmentationButtons); // the shipped mode already lists them in 'segmentationToolbox'
      const utility = extensionManager.getModuleEntry(`${SEGVOL_EXTENSION}.utilityModule.segvol`);
      if (utility) utility.exports.onModeEnter();
    },
    routes: base.routes.map(route => ({
      ...route,
      layoutTemplate: props => {
        const layout = route.layoutTemplate(props);
        layout.props = { ...layout.props, rightPanelDefaultClosed: false,
          rightPanels: [SEGVOL_PANEL, ...(layout.props.rightPanels || []), SEGMENTATION_PANEL] };
        return layout;
      },
    })),
  };
}

export default { id: MODE_ID, modeFactory, extensionDependencies: { [SEGVOL_EXTENSION_URL]: '^0.1.0' } };
