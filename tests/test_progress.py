"""Progress bars: live on a terminal, a line per few percent in a log."""

import io
import re

from fibseg_jax import progress


class Terminal(io.StringIO):
  def isatty(self):
    return True


def test_a_log_gets_a_line_per_five_percent_not_thousands():
  log = io.StringIO()
  with progress.bar(total=2000, desc="train", unit="step", file=log) as bar:
    for step in range(2000):
      bar.update(1)
      if step % 20 == 0:
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}")  # refreshes: not a line each
  text = log.getvalue()
  assert "\r" not in text
  lines = text.splitlines()
  percents = [int(re.match(r"train:\s+(\d+)%", line).group(1)) for line in lines]
  assert percents == list(range(0, 101, 5)), lines
  assert "2000/2000" in lines[-1]


def test_a_log_of_a_resumed_or_unsized_loop_and_a_disabled_bar():
  log = io.StringIO()
  with progress.bar(total=100, initial=40, file=log) as bar:
    bar.update(60)
  assert len(log.getvalue().splitlines()) == 2  # where it resumed, and the end
  log = io.StringIO()
  for _ in progress.bar((i for i in range(500)), file=log):  # unknown total: start, end
    pass
  assert len(log.getvalue().splitlines()) == 2
  log = io.StringIO()
  for _ in progress.bar(range(5), file=log, disable=True):
    pass
  assert log.getvalue() == ""


def test_a_terminal_gets_tqdms_live_bar():
  term = Terminal()
  with progress.bar(total=10, file=term, mininterval=0) as bar:
    for _ in range(10):
      bar.update(1)
  assert term.getvalue().count("\r") >= 10  # redrawn in place
