/**
 * depin-jupyter for JupyterLab 4: the DePIN sidebar, a status-bar item and "Run cell on DePIN"
 * (palette, cell toolbar, Ctrl/Cmd+Shift+Enter). Data come from the server routes under
 * {base_url}depin/ (depin_jupyter/server); the kernel's connection is driven with `%depin` lines.
 */

import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';

import { CommandIDs, runCellOnDepin } from './commands';
import { depinIcon } from './icon';
import { DepinModel } from './model';
import { DepinPanel } from './panel';
import { DepinStatusItem } from './statusbar';

const PLUGIN_ID = 'depin-jupyter:plugin';

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'DePIN sidebar, status bar and the "Run cell on DePIN" command.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette, IStatusBar, ILabShell, ILayoutRestorer, ISettingRegistry],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    palette: ICommandPalette | null,
    statusBar: IStatusBar | null,
    labShell: ILabShell | null,
    restorer: ILayoutRestorer | null,
    settings: ISettingRegistry | null
  ) => {
    const model = new DepinModel();
    const panel = new DepinPanel(model, tracker);
    app.shell.add(panel, 'left', { rank: 850 });
    restorer?.add(panel, 'depin-panel');

    app.commands.addCommand(CommandIDs.runCell, {
      label: 'Run cell on DePIN',
      caption: 'Run the active cell on the Dask cluster (adds %%depin on top of it)',
      icon: depinIcon,
      isEnabled: () => tracker.currentWidget !== null,
      execute: () => runCellOnDepin(tracker)
    });
    app.commands.addCommand(CommandIDs.openPanel, {
      label: 'Show the DePIN panel',
      icon: depinIcon,
      execute: () => app.shell.activateById(panel.id)
    });
    app.commands.addCommand(CommandIDs.refresh, {
      label: 'Refresh DePIN status',
      execute: () => model.refresh(true)
    });
    for (const command of Object.values(CommandIDs)) {
      palette?.addItem({ command, category: 'DePIN' });
    }

    if (statusBar) {
      const item = new DepinStatusItem(model, () => app.shell.activateById(panel.id));
      statusBar.registerStatusItem('depin-jupyter:status', {
        item,
        align: 'left',
        rank: 5,
        isActive: () => true
      });
    }

    if (settings) {
      void settings.load(PLUGIN_ID).then(s => {
        const apply = () => {
          model.fastMs = 1000 * Math.max(1, Number(s.get('refreshSeconds').composite) || 3);
        };
        apply();
        s.changed.connect(apply);
      }).catch(reason => console.warn('depin-jupyter: settings not loaded', reason));
    }
    if (labShell) {
      labShell.currentChanged.connect(() => {
        model.panelVisible = panel.isVisible;
      });
    }
    model.start();
  }
};

export default plugin;
