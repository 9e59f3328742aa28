"""fibseg_jax in napari: a reader for volumes and segmentations, and a dock widget.

`pip install "fibseg_jax[napari]"`, then `napari vol.zarr` opens a volume and
Plugins > Segment with fibseg opens the widget (`widget.FibsegWidget`). The widget calls
`session.Session`, which holds no Qt: the same actions work from Python. This package
sits on top of the library (like `fibseg_jax.cli`); nothing in the library imports it,
and only `widget` and `layers.label_colormap` need napari.
"""
