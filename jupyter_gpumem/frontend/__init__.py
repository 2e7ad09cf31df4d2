"""What the JupyterLab extension talks to: the meter's comm and the display bundles it renders."""
