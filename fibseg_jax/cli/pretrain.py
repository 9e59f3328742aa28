r"""Trains the prior: an enhancer on domain-randomised FIB-SEM draws (no user data).

  fibseg pretrain --workdir=runs/prior --draws=220 --steps=2500 --workers=2
  fibseg pretrain --workdir=runs/prior --export=fibseg_jax/prior

First the pool: random stacks with their truth, brush strokes painted from it and the
random forest fitted on them (`WORKDIR/pool/`, one file a draw); then the enhancer learns
to correct those forests (`WORKDIR/checkpoints/`). Both phases resume where a stopped run
left them, with the same result; `--export` writes prior.msgpack and prior.json (the
provenance: generator version, seeds, steps, this command and its time) to a folder,
which is how the package's fibseg_jax/prior/ is made. On 2 CPU cores the defaults take
a couple of hours (BUILD_NOTES.md, "The prior"); on a GPU only the pool is slow.
"""

import sys
import time

from absl import flags

from fibseg_jax.cli import runner
from fibseg_jax.train import pretrain

_D = pretrain.PretrainConfig()
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the pool and the checkpoints.")
_DRAWS = flags.DEFINE_integer("draws", _D.draws, "Training draws in the pool.")
_HELD_OUT = flags.DEFINE_integer("held_out", _D.held_out, "Held-out draws, scored only.")
_STEPS = flags.DEFINE_integer("steps", _D.steps, "Training steps in all.")
_BATCH = flags.DEFINE_integer("batch_size", _D.batch_size, "Patches per step.")
_PATCH = flags.DEFINE_integer("patch", _D.patch, "Patch side in pixels.")
_LR = flags.DEFINE_float("learning_rate", _D.learning_rate, "Peak learning rate.")
_SEED = flags.DEFINE_integer("seed", _D.seed, "Seed of the weights and batches.")
_WORKERS = flags.DEFINE_integer("workers", _D.workers, "Processes making the pool.")
_SAVE_EVERY = flags.DEFINE_integer("save_every", _D.save_every, "Checkpoint every N steps.")
_EXPORT = flags.DEFINE_string("export", None, "Write prior.msgpack + prior.json here at the end.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")


def main(argv):
  runner.begin(argv, required={"workdir": "runs/prior"})
  try:
    config = pretrain.PretrainConfig(
      draws=_DRAWS.value,
      held_out=_HELD_OUT.value,
      steps=_STEPS.value,
      batch_size=_BATCH.value,
      patch=_PATCH.value,
      learning_rate=_LR.value,
      seed=_SEED.value,
      save_every=_SAVE_EVERY.value,
      workers=_WORKERS.value,
    )
  except ValueError as e:
    sys.exit(f"error: {e}")
  start = time.time()
  try:
    result = pretrain.train(config, _WORKDIR.value, progress=_PROGRESS.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(
    f"pretrain: step {result['step']}; held-out mean IoU of the forest "
    f"{result['held_out'].get('forest_miou')} -> with the enhancer "
    f"{result['held_out'].get('enhancer_miou')} ({result['held_out'].get('slices')} slices)"
  )
  if _EXPORT.value:
    weights = pretrain.export(
      result["trainer"],
      _EXPORT.value,
      {
        "command": " ".join(["fibseg pretrain", *(a for a in sys.argv if a.startswith("--"))]),
        "this_run_seconds": round(time.time() - start, 1),
        "pool_seconds_this_run": result["pool_seconds"],
        "train_seconds_this_run": result["train_seconds"],
        "held_out": result["held_out"],
        "data": "generated only (fibseg_jax.data.randomised); no external data",
      },
    )
    print(f"pretrain: wrote {weights} and its prior.json")


def run(argv: list[str] | None = None) -> None:
  """`fibseg pretrain`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
