"""The shipped prior: prior.msgpack (weights) and prior.json (provenance, sha256); see fibseg_jax.infer.enhance."""
