"""From a dataset build to batches: cluster sampling, masking and the loader (see ``training``
for the map)."""
