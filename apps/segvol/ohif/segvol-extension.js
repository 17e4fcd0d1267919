/*
 * SegVol Label's OHIF extension (ES modules, no build step; served at /ohif/segvol/ and listed in
 * /ohif/app-config.js). It runs inside the OHIF build shipped with monailabel (3.10.0-beta.5) and uses only what that
 * build exposes at runtime: the services, commands and extension managers, cornerstone and cornerstone tools (from
 * @ohif/extension-cornerstone's utility module).
 *
 *   segvol-core.js    pure functions (NRRD, box arithmetic, label merge, training status): node --test checks them
 *   segvol-api.js     the server's REST calls
 *   segvol-viewer.js  the viewer: series, labelmap (OHIF segmentation '1', shared with the MONAI Label panel), tools
 *   segvol-panel.js   the SegVol panel
 *   this file         the extension: the panel module, the commands module (what the panel's buttons and the
 *                     mode's hotkeys run), and the mode's enter/exit hooks
 */

import { SegVolApi } from './segvol-api.js';
import { COMMANDS_CONTEXT, SegVolPanel } from './segvol-panel.js';
import { BOX_TOOL, NEGATIVE_TOOL, POSITIVE_TOOL, PROMPT_TOOLS, SegVolViewer } from './segvol-viewer.js';

const EXTENSION_ID = '@segvol/extension-segvol';
// OHIF 3.10 gives a runtime-loaded module no React to import (it is bundled inside the viewer), so the panel component
// returns the one host element React renders for it as element data, and the panel fills it with plain DOM.
const REACT_ELEMENT = Symbol.for('react.element');

let viewer = null;
let panel = null;
// one ref for every render: React calls it with the host node on mount and with null on unmount only
const mountPanel = node => panel.mount(node);

function SegVolPanelComponent() {
  return { $$typeof: REACT_ELEMENT, type: 'div', key: null, ref: mountPanel, props: { 'data-segvol': 'panel' },
    _owner: null };
}

const extension = {
  id: EXTENSION_ID,

  preRegistration({ servicesManager, commandsManager, extensionManager }) {
    viewer = new SegVolViewer({ servicesManager, commandsManager, extensionManager });
    panel = new SegVolPanel({ viewer, api: new SegVolApi(), commands: commandsManager });
  },

  getPanelModule() {
    return [{
      name: 'segvol',
      iconName: 'tab-segmentation',
      iconLabel: 'SegVol',
      label: 'SegVol',
      secondaryLabel: 'SegVol',
      component: SegVolPanelComponent,
    }];
  },

  getCommandsModule() {
    const actions = {
      segvolRun: () => panel.segment(),
      segvolSave: () => panel.save(),
      segvolNextSample: () => panel.nextSample(),
      segvolActivateTool: ({ toolName }) => {
        if (!PROMPT_TOOLS.includes(toolName)) throw new Error(`not a SegVol prompt tool: ${toolName}`);
        panel.activateTool(toolName);
      },
      segvolClearPrompts: ({ toolNames = PROMPT_TOOLS } = {}) => panel.clearPrompts(toolNames),
      segvolToggleLive: () => panel.toggleLive(),
      segvolRefine: ({ name }) => panel.refine(name),
      segvolUndo: ({ name }) => panel.undo(name),
      segvolRedo: ({ name }) => panel.redo(name),
    };
    const definitions = {
      segvolRun: { commandFn: actions.segvolRun },
      segvolSave: { commandFn: actions.segvolSave },
      segvolNextSample: { commandFn: actions.segvolNextSample },
      segvolActivateTool: { commandFn: actions.segvolActivateTool },
      segvolPositivePoint: { commandFn: actions.segvolActivateTool, options: { toolName: POSITIVE_TOOL } },
      segvolNegativePoint: { commandFn: actions.segvolActivateTool, options: { toolName: NEGATIVE_TOOL } },
      segvolBox: { commandFn: actions.segvolActivateTool, options: { toolName: BOX_TOOL } },
      segvolClearPrompts: { commandFn: actions.segvolClearPrompts },
      segvolToggleLive: { commandFn: actions.segvolToggleLive },
      segvolRefine: { commandFn: actions.segvolRefine },
      segvolUndo: { commandFn: actions.segvolUndo },
      segvolRedo: { commandFn: actions.segvolRedo },
    };
    return { actions, definitions, defaultContext: COMMANDS_CONTEXT };
  },

  // called by segvol-mode.js on mode enter, once the tool groups exist
  getUtilityModule() {
    return [{
      name: 'segvol',
      exports: {
        onModeEnter: () => {
          viewer.registerTools();
          viewer.addToolsToGroups();
        },
      },
    }];
  },

  onModeExit() {
    if (panel) panel.unmount(); // its timers and the viewer event listeners
  },
};

export default extension;
