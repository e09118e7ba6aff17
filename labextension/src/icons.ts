// Icons drawn for this extension, so toolbar buttons and menus are recognisable at a glance.

import { LabIcon } from '@jupyterlab/ui-components';

// A page with opening triple quotes and two lines of text: "write the docstring".
const docstringSvg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M5 2h10l5 5v15H5zm2 2v16h11V8h-4V4z"/>
    <path d="M8.6 9.5h1.5l-.6 2.6H8.3zm2.4 0h1.5l-.6 2.6h-1.2zm2.4 0h1.5l-.6 2.6h-1.2z"/>
    <rect x="8.5" y="14" width="7.5" height="1.4" rx=".3"/>
    <rect x="8.5" y="16.8" width="5" height="1.4" rx=".3"/>
  </g>
</svg>`;

export const docstringIcon = new LabIcon({
  name: 'jupyter-codellama:docstring',
  svgstr: docstringSvg
});
