"""fibseg_jax: deep-learning segmentation of raw FIB-SEM serial-section stacks in JAX.

Layers, one direction of imports: data -> models -> checkpoint -> train -> infer -> eval.
"""

__version__ = "0.1.0"
