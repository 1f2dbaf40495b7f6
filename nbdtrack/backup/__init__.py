"""The backup repository: qcow2 images (full and incremental) that standard tools read."""
