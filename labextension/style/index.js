// Style entry point JupyterLab's builder loads for this extension.
import './base.css';
