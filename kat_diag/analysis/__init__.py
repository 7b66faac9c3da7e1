"""Offline analyses of recorded runs, one module per analysis (DESIGN §3, §4): heatmaps, phases, gradient
geometry, teacher vocabulary, trap statistics, figures."""
