// Icons drawn for this extension, so toolbar buttons and menus are recognisable at a glance.

import { LabIcon } from '@jupyterlab/ui-components';

const docstringSvg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M6 2h9l5 5v15H6zM14 3.5V8h4.5z" fill-rule="evenodd" opacity="0.35"/>
    <path d="M8.5 11.5h2v1.2h-.8v2.6h.8v1.2h-2zM15.5 11.5h-2v1.2h.8v2.6h-.8v1.2h2z"/>
    <rect x="11.2" y="13.4" width="1.6" height="1.2" rx="0.3"/>
  </g>
</svg>`;

export const docstringIcon = new LabIcon({
  name: 'jupyter-codellama:docstring',
  svgstr: docstringSvg
});
