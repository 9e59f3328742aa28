"""The PyTorch peer: MONAI's BasicUNet, trained and run as a MONAI user would write it.

`monai_training` is the one MONAI recipe of the benchmark's race and of the study's
peer row (`fibseg_jax.study.peers`): both train with the same loss and optimizer.

torch and monai are an optional extra (`pip install fibseg_jax[bench]`, `make bench`);
without them the benchmark measures fibseg_jax alone and says why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import platform
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fibseg_jax.bench import machine
from fibseg_jax.bench.options import NUM_CLASSES, Options

INSTALL = "`.venv/bin/pip install torch==2.13.0 monai==1.6.1 psutil` (or run `make bench`)"
# Labels of pixels without truth (`data.volume.IGNORE_LABEL`): no loss there.
IGNORE_LABEL = 255
MONAI_RECIPE = "MONAI BasicUNet, CE + Dice, AdamW 1e-3 (weight decay 1e-4), clip 1"


def monai_training(torch: Any, losses: Any, net: Any) -> tuple[Callable[..., Any], Any]:
  """The MONAI recipe (`MONAI_RECIPE`): (loss function, optimizer) for `net`.

  Cross-entropy plus Dice, both skipping `IGNORE_LABEL` (MONAI's DiceCELoss has no
  ignore_index, MONAI #8734, so DiceLoss with it plus torch's CE); AdamW at 1e-3 with
  weight decay 1e-4. `monai_update` clips the gradients at global norm 1.

  Args:
    torch: the torch module.
    losses: the monai.losses module.
    net: the network (its parameters are optimised).

  Returns:
    (loss(logits [batch, classes, y, x] float, labels [batch, y, x] int64), optimizer).
  """
  dice = losses.DiceLoss(to_onehot_y=True, softmax=True, batch=True, ignore_index=IGNORE_LABEL)
  ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_LABEL)

  def loss(logits, labels):
    return ce(logits, labels) + dice(logits, labels[:, None])

  return loss, torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)


def monai_update(torch: Any, net: Any, optimizer: Any, loss: Any) -> None:
  """One step of the recipe after the forward pass: backward, clip at norm 1, step."""
  loss.backward()
  torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
  optimizer.step()


@dataclasses.dataclass(frozen=True)
class Peer:
  """The imported peer, or why there is none.

  Attributes:
    torch: the torch module, or None.
    monai: the monai module, or None.
    note: why the peer is not measured ("" when it is).
  """

  torch: Any = None
  monai: Any = None
  note: str = ""

  @property
  def available(self) -> bool:
    return self.torch is not None and self.monai is not None


def load_peer(options: Options, importer: Callable[[str], Any] = importlib.import_module) -> Peer:
  """Imports torch and monai when the options ask for the peer.

  Args:
    options: --peer decides whether there is a peer to race; model overrides other than
      BasicUNet's six `features` change the U-Net's layout, so they rule the peer out.
    importer: imports a module by name (tests pass one that fails).

  Returns:
    A `Peer`; when torch or monai is missing its note says how to install them.
  """
  if options.peer == "none":
    return Peer(note="--peer=none: fibseg_jax only")
  overrides = options.model_overrides
  if set(overrides) - {"features"} or len(overrides.get("features", "123456")) != 6:
    return Peer(
      note=f"model overrides {overrides} change the U-Net away from MONAI's BasicUNet "
      "layout (only its six features may change): no peer to race"
    )
  try:
    torch = importer("torch")
    monai = importer("monai")
    importer("monai.networks.nets")
    importer("monai.losses")
  except ImportError as e:
    return Peer(note=f"--peer=monai: cannot import the peer ({e}); install it with {INSTALL}")
  return Peer(torch=torch, monai=monai)


def torch_setup(peer: Peer, threads: int) -> dict[str, Any]:
  """Chooses the torch device and intra-op threads (0 = usable cores); describes them."""
  torch = peer.torch
  torch.set_num_threads(threads or machine.usable_cores())
  cuda = torch.cuda.is_available()
  if cuda:
    # Fixed shapes: let cuDNN pick its algorithms, as XLA autotunes its own.
    torch.backends.cudnn.benchmark = True
  return {
    "device": "cuda" if cuda else "cpu",
    "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
    "threads": torch.get_num_threads(),
    "interop_threads": torch.get_num_interop_threads(),
    "mkldnn": bool(torch.backends.mkldnn.is_available()),
  }


def as_features_first(image: np.ndarray) -> np.ndarray:
  """[batch, slices, y, x, channels] -> [batch, slices * channels, y, x], slice-major.

  The feature order of fibseg_jax's 2.5D U-Net (feature s * channels + c), laid out as
  PyTorch's NCHW.
  """
  b, s, y, x, c = image.shape
  return np.ascontiguousarray(image.transpose(0, 1, 4, 2, 3).reshape(b, s * c, y, x))


class _TorchSide:
  """What the train and forward sides share: the device, the net, sync and peak memory."""

  def __init__(self, peer: Peer, features: Sequence[int], image: np.ndarray, device: str, dtype):
    self._peer = peer
    self._features = tuple(features)
    self._image_np = image
    self._device = device
    self._dtype = dtype
    self.params: int | None = None

  def _net(self):
    torch = self._peer.torch
    torch.manual_seed(0)
    net = self._peer.monai.networks.nets.BasicUNet(
      spatial_dims=2,
      in_channels=self._image_np.shape[1] * self._image_np.shape[4],
      out_channels=NUM_CLASSES,
      features=self._features,
    ).to(self._device)
    self.params = sum(p.numel() for p in net.parameters())
    if self._device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    return net

  def _image(self):
    return self._peer.torch.from_numpy(as_features_first(self._image_np)).to(self._device)

  def _sync(self) -> None:
    if self._device == "cuda":
      self._peer.torch.cuda.synchronize()  # CPU ops return when done

  def _autocast(self):
    if self._dtype == "float32":
      return contextlib.nullcontext()
    torch = self._peer.torch
    return torch.autocast(device_type=self._device, dtype=getattr(torch, self._dtype))

  def device_peak(self) -> int | None:
    if self._device != "cuda":
      return None
    return self._peer.torch.cuda.max_memory_allocated()


class TorchTrainStep(_TorchSide):
  """BasicUNet trained with the MONAI recipe (`monai_training`).

  Args:
    peer: the imported torch and monai.
    features: BasicUNet's six widths (the U-Net's `features`).
    batch: `make_batch` output, converted to NCHW features.
    device: "cpu" or "cuda".
    dtype: "float32", or "bfloat16" for autocast (parameters stay float32).
  """

  def __init__(self, peer, features, batch: dict[str, np.ndarray], device: str, dtype: str):
    super().__init__(peer, features, batch["image"], device, dtype)
    self._labels_np = batch["labels"]
    self._step = None
    self.final_loss: float | None = None

  def prepare(self) -> None:
    torch, monai = self._peer.torch, self._peer.monai
    net = self._net().train()
    loss_fn, optimizer = monai_training(torch, monai.losses, net)
    image = self._image()
    labels = torch.from_numpy(self._labels_np.astype(np.int64)).to(self._device)

    def step():
      optimizer.zero_grad(set_to_none=True)
      with self._autocast():
        logits = net(image)
      loss = loss_fn(logits.float(), labels)
      monai_update(torch, net, optimizer, loss)
      return loss

    self._step = step

  def __call__(self) -> None:
    loss = self._step()
    self._sync()
    self.final_loss = float(loss.detach())

  def close(self) -> None:
    self._step = None


class TorchForward(_TorchSide):
  """BasicUNet forward in `eval()` mode under `torch.inference_mode()`.

  Args:
    peer: the imported torch and monai.
    features: BasicUNet's six widths.
    image: float32 [batch, slices, y, x, channels].
    device: "cpu" or "cuda".
    dtype: "float32" or "bfloat16" (autocast).
  """

  def __init__(self, peer, features, image: np.ndarray, device: str, dtype: str):
    super().__init__(peer, features, image, device, dtype)
    self._forward = None

  def prepare(self) -> None:
    net = self._net().eval()
    image = self._image()

    def forward():
      with self._peer.torch.inference_mode(), self._autocast():
        return net(image)

    self._forward = forward

  def __call__(self) -> None:
    self._forward()
    self._sync()

  def close(self) -> None:
    self._forward = None
