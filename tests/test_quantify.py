"""Phase structure on synthetic volumes with known answers: cube, sphere, channels, blobs."""

import math

import numpy as np
import pytest
import tensorstore as ts

from fibseg_jax.eval import quantify

ANISO = (50.0, 25.0, 25.0)  # z slices twice as thick as the y-x pixels, as in FIB-SEM


def ball(shape, centre, radius_nm, voxel):
  grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
  r2 = sum(((g - c) * v) ** 2 for g, c, v in zip(grids, centre, voxel, strict=True))
  return r2 <= radius_nm**2


def test_cube_volume_fraction_surface_and_connectivity():
  # A 12 x 24 x 24 voxel cube = 600 nm on each side at 50 x 25 x 25 nm voxels.
  labels = np.zeros((20, 36, 36), np.uint8)
  labels[4:16, 6:30, 6:30] = 1
  q = quantify.quantify(labels, ("matrix", "cube"), ANISO)
  cube = q.phases[1]
  assert cube.voxels == 12 * 24 * 24
  assert cube.volume_fraction == pytest.approx(12 * 24 * 24 / labels.size)
  # Marching cubes bevels the 12 edges by about one voxel: a few % short of 6 a^2.
  area = 6 * 600.0**2
  assert 0.93 * area < cube.surface_area_nm2 < area
  # The interface is shared: the matrix has the same area.
  assert q.phases[0].surface_area_nm2 == pytest.approx(cube.surface_area_nm2, rel=1e-6)
  box_um3 = 19 * 0.05 * 35 * 0.025 * 35 * 0.025
  assert cube.surface_density_per_um == pytest.approx(cube.surface_area_nm2 / 1e6 / box_um3)
  assert cube.surface_per_phase_volume_per_um == pytest.approx(cube.surface_area_nm2 / 1e6 / 0.6**3)
  assert cube.connectivity == quantify.Connectivity(1.0, 1, (False, False, False))
  assert q.phases[0].connectivity.percolates == (True, True, True)


@pytest.mark.parametrize("voxel", [(25.0, 25.0, 25.0), ANISO])
def test_sphere_surface_area_within_a_few_percent(voxel):
  radius = 15 * 25.0
  shape = (int(2 * radius / voxel[0]) + 6, 38, 38)
  centre = [(n - 1) / 2 + 0.3 for n in shape]  # off the grid, like a real particle
  mask = ball(shape, centre, radius, voxel)
  area = quantify.surface_area(mask, voxel)
  assert area == pytest.approx(4 * math.pi * radius**2, rel=0.03)
  # Without the mesh smoothing the voxel staircase adds more than 5%.
  assert quantify.surface_area(mask, voxel, steps=0) > 1.05 * 4 * math.pi * radius**2


def test_straight_channel_percolates_along_its_axis_only_and_has_its_width():
  # A round channel along z, radius 6 pixels (150 nm), through a 30 x 31 x 31 box.
  shape = (30, 31, 31)
  disc = ball(shape[1:], (15, 15), 150.0, ANISO[1:])
  labels = np.where(disc, 0, 1).astype(np.uint8)[None].repeat(shape[0], 0)
  q = quantify.quantify(labels, ("pore", "solid"), ANISO, sizes_for=(0,))
  pore = q.phases[0]
  assert pore.connectivity.percolates == (True, False, False)
  assert pore.connectivity.clusters == 1
  # One diameter everywhere along it, 300 nm to within half a pixel.
  assert pore.sizes.d10_nm == pore.sizes.d90_nm
  assert abs(pore.sizes.d50_nm - 300.0) <= 12.5
  # Its wall between the first and last slice: 2 pi r x 29 slices x 50 nm.
  assert pore.surface_area_nm2 == pytest.approx(2 * math.pi * 150 * 29 * 50, rel=0.03)
  # The solid around it percolates along every axis.
  assert q.phases[1].connectivity.percolates == (True, True, True)


def test_thickness_uses_the_anisotropic_voxel_size():
  # A layer 3 slices thick (150 nm) across y-x, and one 3 pixels wide (75 nm) across z.
  flat = np.zeros((9, 24, 24), bool)
  flat[3:6] = True
  wall = np.zeros((9, 24, 24), bool)
  wall[:, :, 10:13] = True
  # 2 r with r to the centre of the first voxel outside: one voxel of that axis over.
  assert np.unique(quantify.local_thickness(flat, ANISO)[flat]) == pytest.approx([150.0 + 50])
  assert np.unique(quantify.local_thickness(wall, ANISO)[wall]) == pytest.approx([75.0 + 25])


def test_pore_size_distribution_of_two_sphere_sizes():
  voxel = (25.0, 25.0, 25.0)
  shape = (40, 40, 70)
  small = ball(shape, (20, 20, 14), 100.0, voxel)
  large = ball(shape, (20, 20, 48), 200.0, voxel)
  mask = small | large
  thickness = quantify.local_thickness(mask, voxel)
  # Each ball has one diameter, within half a voxel of 2 R.
  assert len(np.unique(thickness[small])) == len(np.unique(thickness[large])) == 1
  assert abs(thickness[small][0] - 200.0) <= 12.5
  assert abs(thickness[large][0] - 400.0) <= 12.5
  sizes = quantify.SizeDistribution.from_thickness(thickness, mask)
  assert sizes.d10_nm == thickness[small][0] and sizes.d90_nm == thickness[large][0]
  small_share = small.sum() / mask.sum()
  assert sizes.volume_fractions[0] == pytest.approx(small_share)
  assert sizes.mean_nm == pytest.approx(
    small_share * thickness[small][0] + (1 - small_share) * thickness[large][0]
  )
  # With fewer radii than distinct distances, balls round down, never up.
  coarse = quantify.local_thickness(mask, voxel, bins=3)
  assert np.all(coarse[mask] <= thickness[mask] + 1e-3) and coarse[mask].min() > 0


def test_two_disjoint_blobs_largest_cluster_is_the_bigger_share():
  labels = np.zeros((10, 30, 30), np.uint8)
  labels[2:8, 2:12, 2:12] = 1  # 600 voxels
  labels[2:5, 15:25, 15:25] = 1  # 300 voxels
  labels[2:8, 12, 2:6] = 0  # still apart (face connectivity)
  c = quantify.connectivity(labels == 1)
  assert c.clusters == 2
  assert c.largest_fraction == pytest.approx(600 / 900)
  # Touching only along an edge is not connected (6-connectivity).
  labels[5, 12, 13] = 1  # joins neither: diagonal neighbour of both
  assert quantify.connectivity(labels == 1).clusters == 3


def test_subvolume_is_the_whole_stack_or_a_centred_near_cube_within_budget():
  whole = quantify.choose_subvolume((10, 20, 20), ANISO, max_voxels=4000)
  assert whole.whole and whole.start == (0, 0, 0)
  box = quantify.choose_subvolume((400, 4000, 4000), ANISO, max_voxels=1 << 24)
  assert box.voxels <= 1 << 24 and not box.whole
  sides_nm = [n * v for n, v in zip(box.shape, ANISO, strict=True)]
  assert max(sides_nm) - min(sides_nm) <= 50  # a cube to within one z voxel
  assert box.start == tuple((n - s) // 2 for n, s in zip((400, 4000, 4000), box.shape, strict=True))
  # A thin stack: the box takes every slice and grows in y-x instead.
  thin = quantify.choose_subvolume((8, 4000, 4000), ANISO, max_voxels=1 << 20)
  assert thin.shape[0] == 8 and thin.shape[1] == thin.shape[2] == 362


def test_quantify_stack_reads_only_the_subvolume_and_sizes_the_pores():
  labels = np.ones((12, 40, 40), np.uint8)
  labels[:, 18:23, 18:23] = 0  # channel along z through the centre
  labels[0, :5, :5] = 255  # outside the subvolume below: never read
  spec = {"driver": "zarr3", "kvstore": {"driver": "memory"}, "create": True}
  array = ts.open(spec, dtype=ts.uint8, shape=labels.shape).result()
  array.write(labels).result()
  q = quantify.quantify_stack(array, ("pore", "csh"), ANISO, max_voxels=12 * 20 * 20)
  # The largest near-cube of 4800 voxels: 10 slices (500 nm) x 21 x 21 pixels (525 nm).
  assert q.subvolume.shape == (10, 21, 21) and q.subvolume.start == (1, 9, 9)
  assert q.not_segmented == 0
  assert q.phases[0].sizes is not None and q.phases[1].sizes is None
  assert q.phases[0].volume_fraction == pytest.approx(25 / 441)
  doc = q.to_json()
  assert doc["phases"]["pore"]["percolates"] == {"z": True, "y": False, "x": False}
  assert doc["voxel_size_nm"] == list(ANISO)


def _spheres(shape, centres, radius):
  z, y, x = np.indices(shape)
  labels = np.ones(shape, np.uint8)  # solid
  for c in centres:
    labels[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= radius**2] = 0  # pore
  return labels


def test_a_thin_stack_flags_percolation_and_sizes_but_keeps_the_numbers():
  # 0.12 µm deep, pores 0.2 µm across running through it: every phase "percolates
  # along z", and the pores' d90 is bounded by the box, as on the 0.36 µm stack of issue 32.
  labels = _spheres((4, 100, 100), [(1, 25, 25), (2, 70, 60)], 10)
  q = quantify.quantify(labels, ("pore", "solid"), (30, 10, 10), sizes_for=(0,))
  pore, solid = q.phases
  assert pore.connectivity.percolates[0] and solid.connectivity.percolates[0]
  assert pore.sizes is not None and pore.sizes.d90_nm > 0  # the numbers stay
  text = " ".join(pore.caveats)
  assert "pore percolation along z: the box is only 0.12 µm along z, under 3x" in text
  assert "pore sizes: the box is only 0.12 µm along z, under 3x the d90" in text
  assert "local thickness treats the faces as open" in text
  assert any(c.startswith("solid percolation along z") for c in solid.caveats)
  assert "along y" not in text and "along x" not in text  # 1 µm wide: 5 pores across
  assert q.to_json()["phases"]["pore"]["caveats"] == list(pore.caveats)


def test_a_deep_box_with_pores_inside_has_no_caveats():
  labels = _spheres((40, 40, 40), [(20, 20, 20)], 4)
  q = quantify.quantify(labels, ("pore", "solid"), (10, 10, 10), sizes_for=(0,))
  pore = q.phases[0]
  assert pore.sizes is not None and pore.caveats == ()
  assert not any(pore.connectivity.percolates)
  assert (
    quantify.face_share(labels == 0, quantify.local_thickness(labels == 0, (10,) * 3), (10,) * 3)
    == 0
  )
