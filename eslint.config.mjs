// ESLint for the OHIF extension (apps/segvol/ohif) and its unit tests (tests/ohif): plain ES modules run by the browser
// (the extension) or by `node --test` (the tests). ESLint itself is a dev dependency of tests/e2e/package.json
// (bash scripts/install_system_deps.sh installs it); tests/test_ohif_js.py runs it. Core rules only: the config
// imports nothing, so it resolves from any folder.
const browser = Object.fromEntries(['window', 'document', 'console', 'fetch', 'FormData', 'Blob', 'URL', 'TextDecoder',
  'TextEncoder', 'performance', 'setTimeout', 'clearTimeout', 'setInterval', 'clearInterval'].map(n => [n, 'readonly']));

export default [
  {
    files: ['apps/segvol/ohif/**/*.js', 'tests/ohif/**/*.mjs'],
    languageOptions: { ecmaVersion: 2022, sourceType: 'module', globals: browser },
    rules: {
      'no-undef': 'error',
      'no-unused-vars': ['error', { args: 'after-used', caughtErrors: 'none' }],
      'no-redeclare': 'error',
      'no-dupe-keys': 'error',
      'no-duplicate-imports': 'error',
      'no-unreachable': 'error',
      'no-constant-condition': 'error',
      'no-fallthrough': 'error',
      'no-self-assign': 'error',
      'no-shadow': 'error',
      'no-var': 'error',
      'prefer-const': 'error',
      eqeqeq: ['error', 'always'],
      'no-implicit-globals': 'error',
      'no-use-before-define': ['error', { functions: false, classes: true }],
      'max-len': ['error', { code: 120, ignoreStrings: true, ignoreTemplateLiterals: true }],
    },
  },
  {
    files: ['apps/segvol/ohif/app-config.js'], // a classic script OHIF's page loads before its bundle
    languageOptions: { sourceType: 'script' },
  },
];
