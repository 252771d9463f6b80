import { LabIcon } from '@jupyterlab/ui-components';

/** A node with three links (a small network of machines) — the DePIN mark. */
const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <circle cx="12" cy="4.5" r="2.6"/>
    <circle cx="4.5" cy="18" r="2.6"/>
    <circle cx="19.5" cy="18" r="2.6"/>
    <circle cx="12" cy="13" r="3.2"/>
    <path d="M11.2 6.8h1.6v3.4h-1.6zM6.1 16.2l3.6-2.1.8 1.4-3.6 2.1zM13.5 15.5l.8-1.4 3.6 2.1-.8 1.4z"/>
  </g>
</svg>`;

export const depinIcon = new LabIcon({ name: 'depin-jupyter:depin', svgstr: svg });
