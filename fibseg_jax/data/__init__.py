"""Volume store, ingest of instrument images, synthetic phantoms and the slab loader."""
