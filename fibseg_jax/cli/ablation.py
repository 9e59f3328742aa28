r"""The training recipe, part by part, with seeds (`fibseg_jax.study.ablation`).

  fibseg ablation --out=ablation/ [--budget=quick] [--seeds=0,1,2]
  fibseg ablation --out=ablation_real/ --volume=vol.zarr --train_slices=4,8,12 \
    --eval_slices=16 [--rows=baseline,full] [--steps=1000]
  fibseg ablation --out=budgets/ --compare=ablation_real/,ablation_real_1000/

--compare trains nothing: finished ablations of one stack at other --steps, side by side
(budgets.json, budgets.md and budgets.png in --out: mean IoU and each class against the
step budget), to see where accuracy stops rising.

Rows: the baseline (the first recipe), full (every augmentation and sampling part on)
and + each part alone (spatial, intensity, artifacts, deep_supervision, rare_class,
sgd_poly). Every row is the same U-Net on the same slices, split and step budget, scored
on --eval_slices without test-time augmentation; mean +- std over seeds and the paired
difference to the baseline of the same seed. Writes ablation.json and ablation.md;
rerunning resumes (finished runs are kept), and an --out holds one setting (other
--steps, slices or volume are refused: use another --out). Default volume: the
synthetic stack of the budget, generated in OUT/volume.zarr.
"""

import os
import sys

from absl import flags

from fibseg_jax import outputs, study
from fibseg_jax.cli import runner, stack_flags
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.study import ablation, figures, runs

_FINISHED = flags.DEFINE_bool(
  "finished_only", False, "Train nothing: rewrite the table from the finished runs."
)
_ROWS = flags.DEFINE_list("rows", None, f"Only these rows, of: {', '.join(ablation.rows())}.")
BUDGETS_KIND = "ablation budgets"
_COMPARE = flags.DEFINE_list(
  "compare",
  None,
  "Train nothing: these finished ablations (--out folders or ablation.json) of one stack "
  "at other --steps, against the step budget, into --out (with --rows: only those rows).",
)


def compare(out: str, paths: list[str]) -> None:
  """--compare: the budgets table and figure of finished ablations, written to `out`."""
  document = ablation.compare_budgets([ablation.read_document(p) for p in paths], _ROWS.value)
  try:  # a new folder, or this command's earlier one; never inside a compared ablation
    outputs.claim(out, kind=BUDGETS_KIND, flag="--out", inputs={"--compare": paths}, directory=True)
  except outputs.OutputError as e:
    raise ValueError(str(e)) from e
  runs.write_json(os.path.join(out, "budgets.json"), document)
  table = ablation.budgets_markdown(document)
  with open(os.path.join(out, "budgets.md"), "w") as f:
    f.write(table)
  figures.budget_plot(document, os.path.join(out, "budgets.png"))
  print(table)
  print(f"wrote {out}/budgets.json, budgets.md and budgets.png")


def main(argv):
  runner.begin(argv, required={"out": "ablation/"})
  if _COMPARE.value:
    try:
      compare(stack_flags.OUT.value, _COMPARE.value)
    except ValueError as e:
      sys.exit(f"error: {e}")
    return
  try:
    ablation.claim_directory(stack_flags.OUT.value, stack_flags.VOLUME.value)
    study.cache_compilations(stack_flags.OUT.value)
    budget = stack_flags.budget()
    document = ablation.run_ablation(
      stack_flags.OUT.value,
      budget,
      **stack_flags.stack(budget),
      row_names=_ROWS.value,
      finished_only=_FINISHED.value,
      log=lambda line: print(line, flush=True),
    )
  except (ValueError, volume_lib.VolumeError) as e:  # user mistakes
    sys.exit(f"error: {e}")
  print(ablation.markdown(document))
  print(f"wrote {stack_flags.OUT.value}/ablation.json ({len(document['rows'])} rows)")


def run(argv: list[str] | None = None) -> None:
  """`fibseg ablation`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
