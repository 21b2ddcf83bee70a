"""Image discovery, decoding, ADM crop, the Zarr latent cache and its reader."""
