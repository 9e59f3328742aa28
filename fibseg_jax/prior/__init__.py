"""The shipped prior: prior.msgpack (weights), prior.json (provenance, sha256).

See `fibseg_jax.infer.enhance` (loads it) and `fibseg_jax.train.pretrain` (makes it).
"""
