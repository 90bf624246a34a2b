"""Dense-set readers on tiny fixtures laid out as VOC 2012, ADE20K, NYU Depth v2 and the plain layout
name their files; the one-line errors for wrong or partial folders and bad labels; and the synthetic
generator's labels, checked against their construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dense_layouts import make_ade, make_nyu, make_voc, mask_array, write_png
from PIL import Image

from pipeline import dense_synth
from pipeline.dense_data import (
    IGNORE,
    detect_layout,
    open_dense,
    read_depth,
    read_image,
    read_mask,
)
from pipeline.errors import DataError


def test_voc_layout_reads_palette_indices(tmp_path):
    ds = open_dense(make_voc(tmp_path), "seg")
    assert (ds.layout, ds.kind, ds.num_classes) == ("voc", "seg", 21)
    assert [p.image.stem for p in ds.train] == ["2007_000032", "2007_000039"] and len(ds.val) == 1
    image = read_image(ds.val[0].image)
    assert image.shape == (3, 20, 30) and image.dtype == torch.uint8
    mask = read_mask(ds.val[0].label, (20, 30), ds)
    assert torch.equal(mask, torch.from_numpy(mask_array().astype(np.int64)))  # indices, not palette colours


def test_ade20k_layout_reduces_the_zero_label(tmp_path):
    make_ade(tmp_path)
    ds = open_dense(tmp_path, "seg")  # the folder above ADEChallengeData2016
    assert (ds.layout, ds.num_classes) == ("ade20k", 150)
    mask = read_mask(ds.train[0].label, (20, 30), ds)
    assert mask[0, 0] == IGNORE and mask[0, 15] == 0 and mask[0, 25] == 149  # 0 -> ignore, k -> k - 1


def test_nyu_layout_reads_millimetres_and_val_is_test(tmp_path):
    ds = open_dense(make_nyu(tmp_path), "depth")
    assert (ds.layout, ds.kind) == ("nyu", "depth")
    assert ds.val[0].image.parent.name == "kitchen_0002" and ds.val[0].label.name == "sync_depth_00045.png"
    depth = read_depth(ds.train[0].label, (20, 30), ds)
    assert depth.dtype == torch.float32 and torch.allclose(depth, torch.full((20, 30), 2.5))


def test_plain_layout_from_the_generator(tmp_path):
    seg = open_dense(dense_synth.build(tmp_path / "seg", "seg", 3, 2, (24, 32)), "seg")
    assert (seg.layout, seg.num_classes, len(seg.train), len(seg.val)) == ("plain", 8, 3, 2)
    assert seg.classes[0] == "astronaut"
    depth = open_dense(dense_synth.build(tmp_path / "depth", "depth", 2, 1, (24, 32)), "depth")
    assert depth.kind == "depth" and read_depth(depth.val[0].label, (24, 32), depth).min() > 0.5
    with pytest.raises(DataError, match="holds depth labels, not seg"):
        open_dense(tmp_path / "depth", "seg")


def test_plain_layout_counts_classes_without_classes_txt(tmp_path):
    root = dense_synth.build(tmp_path / "seg", "seg", 3, 2, (24, 32))
    (root / "classes.txt").unlink()
    ds = open_dense(root, "seg")
    top = max(int(m[m != IGNORE].max()) for m in (np.asarray(Image.open(p.label)) for p in ds.train + ds.val))
    assert ds.num_classes == top + 1


def test_missing_split_list_is_one_line(tmp_path):
    with pytest.raises(DataError, match=r"Segmentation/val\.txt: missing split list"):
        open_dense(make_voc(tmp_path, val_list=False), "seg")


def test_listed_file_missing(tmp_path):
    root = make_voc(tmp_path)
    (root / "VOC2012" / "SegmentationClass" / "2007_000039.png").unlink()
    with pytest.raises(DataError, match="1 listed file.* missing, the first .*2007_000039.png"):
        open_dense(root, "seg")


def test_mask_of_the_wrong_size(tmp_path):
    root = make_voc(tmp_path)
    write_png(root / "VOC2012" / "SegmentationClass" / "2007_000033.png", mask_array((10, 30)), palette=True)
    ds = open_dense(root, "seg")
    with pytest.raises(DataError, match=r"mask is 30x10 but its image is 30x20"):
        read_mask(ds.val[0].label, tuple(read_image(ds.val[0].image).shape[1:]), ds)


def test_colour_mask_and_out_of_range_class(tmp_path):
    root = make_voc(tmp_path)
    ds = open_dense(root, "seg")
    write_png(ds.val[0].label, np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(DataError, match="class-index PNG .* got mode RGB"):
        read_mask(ds.val[0].label, (20, 30), ds)
    write_png(ds.val[0].label, np.full((20, 30), 21, np.uint8))
    with pytest.raises(DataError, match="class index 21 but the voc set has 21 classes"):
        read_mask(ds.val[0].label, (20, 30), ds)


def test_depth_png_of_the_wrong_dtype(tmp_path):
    root = make_nyu(tmp_path)
    ds = open_dense(root, "depth")
    write_png(ds.val[0].label, np.full((20, 30), 25, np.uint8))  # 8-bit: the scale is lost
    with pytest.raises(DataError, match="must be a 16-bit greyscale PNG .* mode L \\(8-bit\\)"):
        read_depth(ds.val[0].label, (20, 30), ds)


def test_wrong_or_partial_folders(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        open_dense(tmp_path / "nope", "seg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a dense dataset folder"):
        detect_layout(tmp_path / "empty")
    root = dense_synth.build(tmp_path / "plain", "seg", 2, 1, (24, 32))
    for f in (root / "val" / "masks").iterdir():
        f.unlink()
    (root / "val" / "masks").rmdir()
    with pytest.raises(DataError, match=r"val: missing masks/"):
        open_dense(root, "seg")
    ade = make_ade(tmp_path / "ade")
    for f in (ade / "annotations" / "validation").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="ADE_val_00000001.png"):
        open_dense(ade, "seg")


def test_generator_seg_labels_match_the_textures(tmp_path):
    # Photos of one flat colour per class: every labelled pixel must show exactly its class's colour.
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]], np.uint8)
    photos = {f"c{i}": [np.broadcast_to(c, (40, 50, 3)).copy()] for i, c in enumerate(colours)}
    for seed in range(5):
        image, mask = dense_synth.seg_scene(photos, (48, 64), np.random.default_rng(seed))
        labelled = mask != IGNORE
        assert image.shape == (48, 64, 3) and 0.5 < labelled.mean() < 1
        assert np.abs(image[labelled].astype(int) - colours[mask[labelled]]).max() <= 1
    a = dense_synth.build(tmp_path / "a", "seg", 2, 1, (24, 32), seed=5)
    b = dense_synth.build(tmp_path / "b", "seg", 2, 1, (24, 32), seed=5)
    for f in sorted((a / "train").rglob("*.png")):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()  # seeded: the same files


def test_generator_depth_is_the_analytic_plane():
    # A fronto-parallel plane at 3 m: every pixel's depth is 3 m.
    z, _ = dense_synth.plane_depth((12, 16), np.array([0.0, 0.0, 1.0]), 3.0)
    assert torch.allclose(z, torch.full((12, 16), 3.0, dtype=z.dtype))
    # A tilted plane: every pixel's 3-D point z·r lies on it (n·X = h).
    n = np.array([0.3, -0.5, 1.0]) / np.linalg.norm([0.3, -0.5, 1.0])
    z, rays = dense_synth.plane_depth((12, 16), n, 2.0)
    on_plane = (z[..., None] * rays) @ torch.from_numpy(n)
    assert torch.allclose(on_plane, torch.full_like(on_plane, 2.0)) and z.std() > 0.05
    image, depth = dense_synth.depth_scene(
        dense_synth.photo_classes(split="val"), (24, 32), np.random.default_rng(0)
    )
    assert depth.dtype == np.uint16 and image.shape == (24, 32, 3) and 500 < depth.min() <= depth.max()
