"""Storage backends (nbdkit-style plugins) and the filter base that wraps them."""
