"""Routes, grouped by resource: home (models, runs, health), models (model and layer pages),
neurons (neuron, channel, compare), search."""
