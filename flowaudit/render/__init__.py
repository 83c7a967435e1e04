"""Report renderers: terminal text, the self-contained HTML page, its plots and the worst-input panel."""
