"""What users see in Jupyter: the diagnosis panel, the live gauge, the sidebar.

The only package that imports ipywidgets, plotly and sidecar; nothing outside ``ui`` imports it.
"""
