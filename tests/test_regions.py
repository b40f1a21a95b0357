"""Region interface: image patches and object crops."""

import ml_collections
import numpy as np
import pytest

from mmelectra.data import regions


def random_image(size, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def region_cfg(**overrides):
  cfg = dict(image_size=32, regions="patches", patch_size=8, crop_size=4, max_regions=5)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


# --- patches ----------------------------------------------------------------------------
def test_patch_features_are_the_patch_pixels_in_row_major_order():
  image = random_image(32)
  out = regions.image_to_patches(image, 8)
  assert out.feats.shape == (16, 8 * 8 * 3) and out.feats.dtype == np.float32
  for k in range(16):
    row, col = divmod(k, 4)
    patch = image[row * 8:(row + 1) * 8, col * 8:(col + 1) * 8]
    np.testing.assert_array_equal(regions.denormalise_pixels(out.feats[k]).reshape(8, 8, 3), patch)
    np.testing.assert_allclose(out.boxes[k], [col / 4, row / 4, (col + 1) / 4, (row + 1) / 4])
  assert out.mask.dtype == bool and out.mask.all()
  assert out.labels.dtype == np.int32 and np.all(out.labels == -1)


def test_patch_boxes_tile_the_unit_square():
  out = regions.image_to_patches(random_image(48), 16)
  boxes = out.boxes.astype(np.float64)
  assert out.boxes.dtype == np.float32
  assert boxes.min() == 0 and boxes.max() == 1
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  np.testing.assert_allclose(areas.sum(), 1.0)
  # Cell centres on a 100 x 100 grid fall in exactly one box.
  centres = (np.arange(100) + 0.5) / 100
  x, y = np.meshgrid(centres, centres)
  inside = ((x[..., None] >= boxes[:, 0]) & (x[..., None] < boxes[:, 2]) &
            (y[..., None] >= boxes[:, 1]) & (y[..., None] < boxes[:, 3]))
  assert np.all(inside.sum(-1) == 1)


def test_patches_reject_sizes_that_do_not_divide():
  with pytest.raises(ValueError, match="not divisible by patch_size 5"):
    regions.image_to_patches(random_image(32), 5)
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    regions.image_to_patches(np.zeros((32, 32), np.uint8), 8)
  with pytest.raises(ValueError, match="uint8"):
    regions.image_to_patches(np.zeros((32, 32, 3), np.float32), 8)


# --- crops ------------------------------------------------------------------------------
def test_crops_resize_each_box_and_pad_to_max_regions():
  image = np.zeros((16, 16, 3), np.uint8)
  image[0:4, 0:4] = (255, 0, 0)
  image[8:16, 4:12] = (0, 0, 255)
  image[2, 10] = (0, 255, 0)
  boxes = np.array([[0, 0, 4 / 16, 4 / 16], [4 / 16, 8 / 16, 12 / 16, 1.0],
                    [10 / 16, 2 / 16, 10 / 16, 2 / 16]], np.float32)  # last: zero-size box
  out = regions.object_crops(image, boxes, np.array([7, 3, 11]), crop_size=2, max_regions=5)
  assert out.feats.shape == (5, 2 * 2 * 3) and out.feats.dtype == np.float32
  np.testing.assert_array_equal(out.feats[0].reshape(2, 2, 3), regions.normalise_pixels(np.broadcast_to(np.array([1, 0, 0], np.uint8) * 255, (2, 2, 3))))
  np.testing.assert_array_equal(out.feats[1].reshape(2, 2, 3), regions.normalise_pixels(np.broadcast_to(np.array([0, 0, 1], np.uint8) * 255, (2, 2, 3))))
  # A zero-size box still reads one pixel.
  np.testing.assert_array_equal(out.feats[2].reshape(2, 2, 3), regions.normalise_pixels(np.broadcast_to(np.array([0, 1, 0], np.uint8) * 255, (2, 2, 3))))
  np.testing.assert_array_equal(out.feats[3:], 0)
  np.testing.assert_array_equal(out.boxes[:3], boxes)
  np.testing.assert_array_equal(out.boxes[3:], 0)
  np.testing.assert_array_equal(out.mask, [True, True, True, False, False])
  np.testing.assert_array_equal(out.labels, [7, 3, 11, -1, -1])
  assert out.labels.dtype == np.int32 and out.boxes.dtype == np.float32


def test_crop_resize_is_nearest_neighbour():
  image = random_image(8)
  out = regions.object_crops(image, np.array([[0.25, 0.5, 0.5, 0.75]]), np.array([0]),
                             crop_size=4, max_regions=1)
  crop = image[4:6, 2:4]  # 2 x 2 pixels, each repeated 2 x 2
  expected = crop.repeat(2, axis=0).repeat(2, axis=1)
  np.testing.assert_array_equal(regions.denormalise_pixels(out.feats[0]).reshape(4, 4, 3), expected)


def test_crops_with_no_boxes_are_all_padding():
  out = regions.object_crops(random_image(8), np.zeros((0, 4)), np.zeros((0,)), 2, 3)
  assert not out.mask.any() and np.all(out.labels == -1) and not out.feats.any()


def test_crop_errors_name_the_problem():
  image = random_image(16)
  boxes = np.tile([[0, 0, 0.5, 0.5]], (5, 1))
  with pytest.raises(ValueError, match="5 boxes do not fit in max_regions=4"):
    regions.object_crops(image, boxes, np.zeros(5), 2, 4)
  with pytest.raises(ValueError, match=r"labels must be \[N\]"):
    regions.object_crops(image, boxes[:2], np.zeros(3), 2, 4)
  with pytest.raises(ValueError, match=r"boxes must be \[N, 4\]"):
    regions.object_crops(image, boxes[:, :3], np.zeros(5), 2, 8)
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    regions.object_crops(image, np.array([[0, 0, 16, 16]]), np.zeros(1), 2, 4)
  with pytest.raises(ValueError, match="x1 <= x2"):
    regions.object_crops(image, np.array([[0.5, 0, 0.2, 0.5]]), np.zeros(1), 2, 4)


# --- sizes from the config ---------------------------------------------------------------
def test_feature_dim_and_num_regions_follow_the_mode():
  cfg = region_cfg()
  assert regions.num_regions(cfg) == 16 and regions.feature_dim(cfg) == 8 * 8 * 3
  cfg = region_cfg(regions="crops")
  assert regions.num_regions(cfg) == 5 and regions.feature_dim(cfg) == 4 * 4 * 3
  out = regions.image_to_patches(random_image(32), 8)
  assert out.feats.shape == (regions.num_regions(region_cfg()), regions.feature_dim(region_cfg()))
  with pytest.raises(ValueError, match="'boxes'"):
    regions.num_regions(region_cfg(regions="boxes"))
  with pytest.raises(ValueError, match="'boxes'"):
    regions.feature_dim(region_cfg(regions="boxes"))
  with pytest.raises(ValueError, match="not divisible"):
    regions.num_regions(region_cfg(patch_size=5))
