"""Offline analyses of recorded runs (DESIGN §4): heatmaps, phases, figures."""
