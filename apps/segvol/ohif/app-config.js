/*
 * SegVol Label's OHIF configuration, served at /ohif/app-config.js by the SegVol Label server
 * (apps/segvol/segvol_ohif.py) in place of the one inside the monailabel package. The viewer is the OHIF build
 * shipped with monailabel (3.10.0-beta.5); what this file adds:
 *   - extension /ohif/segvol/segvol-extension.js: the SegVol panel and its point tools;
 *   - mode /ohif/segvol/segvol-mode.js: the MONAI Label mode (same id, so it replaces the built-in one) with the
 *     SegVol panel, the MONAI Label panel and OHIF's segmentation panel (brush, eraser, shapes) on the right.
 * Images come from the DICOMweb server the app was started with (--studies), through the app's /proxy/dicom.
 */
(function () {
  // The MONAI Label panel reads its server address from this cookie (default: this host, port 8000). The server that
  // serves this file is the SegVol Label server, so point the panel at it unless the annotator chose another one.
  const here = window.location.origin + '/';
  const match = document.cookie.match(/(?:^|;\s*)MONAILABEL_SERVER_URL=([^;]*)/);
  if (!match || !match[1]) {
    document.cookie = 'MONAILABEL_SERVER_URL=' + here + '; path=/; SameSite=Strict';
  }
})();

window.config = {
  routerBasename: '/ohif/',
  showStudyList: true,
  extensions: ['/ohif/segvol/segvol-extension.js'],
  modes: ['/ohif/segvol/segvol-mode.js'],
  showWarningMessageForCrossOrigin: true,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'dicomweb',
  useSharedArrayBuffer: 'FALSE',
  investigationalUseDialog: { option: 'never' },
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'dicomweb',
      configuration: {
        friendlyName: 'SegVol Label (DICOMweb)',
        name: 'SegVolLabel',
        wadoUriRoot: '/proxy/dicom/wado',
        qidoRoot: '/proxy/dicom/qido',
        wadoRoot: '/proxy/dicom/wado',
        qidoSupportsIncludeField: true,
        supportsReject: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: false,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
        dicomUploadEnabled: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
