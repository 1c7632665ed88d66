"""VQ decoders: image-token grids to pixels."""
