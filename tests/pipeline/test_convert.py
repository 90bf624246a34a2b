"""pipeline.convert on a small ImageNet-style tree of real photos plus every oddity ImageNet has."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from photo_oddities import KEPT, REENCODED, make_oddities
from PIL import Image

from pipeline import convert as cv
from pipeline.demo import PHOTOS
from pipeline.errors import ConvertError, ShardError
from pipeline.shard_write import write_shard
from pipeline.shards import verify_shard

WNIDS = {"n01440764": "astronaut", "n01443537": "cat", "n01484850": "coffee"}  # class folder -> demo class
ODD_WNID = "n01484850"  # the oddities live in this class folder
REPO = Path(__file__).resolve().parents[2]


def build_tree(root: Path) -> dict:
    """train/<wnid>/ with real photos and oddities, a flat val/ labelled by LOC_val_solution.csv.

    -> {"labels": {(split, key): label}, "skipped": {rel path: reason prefix}, "kept": {rel: src bytes},
        "reencoded": {rel paths}}
    """
    labels, skipped, kept, reencoded = {}, {}, {}, set()
    for label, (wnid, demo) in enumerate(sorted(WNIDS.items())):
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for i, photo in enumerate(sorted((PHOTOS / "train" / demo).glob("*.jpg"))[:3]):
            name = f"{wnid}_{i}.JPEG"
            shutil.copy(photo, folder / name)
            labels["train", f"{wnid}/{wnid}_{i}"] = label
            kept[f"train/{wnid}/{name}"] = photo.read_bytes()
    (root / "train" / "n01440764" / "notes.txt").write_text("not an image")
    # names that are not tar-safe, and two that collide once made safe
    shutil.copy(PHOTOS / "train/cat/cat_train_05.jpg", root / "train/n01443537/odd name.v2.JPEG")
    shutil.copy(PHOTOS / "train/cat/cat_train_06.jpg", root / "train/n01443537/odd_name_v2.JPEG")
    labels["train", "n01443537/odd_name_v2"] = labels["train", "n01443537/odd_name_v2_1"] = 1
    for name, expected in make_oddities(root / "train" / ODD_WNID).items():
        rel = f"train/{ODD_WNID}/{name}"
        if expected.startswith("skip:"):
            skipped[rel] = expected[5:]
            continue
        labels["train", f"{ODD_WNID}/{name.rsplit('.', 1)[0]}"] = 2
        if expected == KEPT:
            kept[rel] = (root / rel).read_bytes()
        else:
            assert expected == REENCODED
            reencoded.add(rel)

    val = root / "val"
    val.mkdir()
    rows = ["ImageId,PredictionString"]
    for i, (wnid, demo) in enumerate(sorted(WNIDS.items()) * 2):
        image_id = f"ILSVRC2012_val_{i + 1:08d}"
        shutil.copy(PHOTOS / "val" / demo / f"{demo}_val_{i // 3:02d}.jpg", val / f"{image_id}.JPEG")
        rows.append(f"{image_id},{wnid} 10 20 110 120 {wnid} 5 5 50 50")
        labels["val", image_id] = sorted(WNIDS).index(wnid)
    shutil.copy(PHOTOS / "val/cat/cat_val_00.jpg", val / "ILSVRC2012_val_00000099.JPEG")  # no CSV row
    skipped["val/ILSVRC2012_val_00000099.JPEG"] = "no label"
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return {"labels": labels, "skipped": skipped, "kept": kept, "reencoded": reencoded}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("imagenet")
    return root, build_tree(root)


@pytest.fixture(scope="module")
def converted(tree, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shards")
    return out, cv.convert(tree[0], out, shard_size=4, workers=2, seed=3, quiet=True)


def read_all(out: Path) -> dict[tuple[str, str], tuple[int, bytes]]:
    """Every sample via the shards' own reader -> {(split, key): (label, jpeg bytes)}."""
    meta = json.loads((out / "dataset.json").read_text())
    found = {}
    for rec in meta["shards"]:
        with tarfile.open(out / rec["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".jpg"):
                key = name[:-4]
                assert (rec["split"], key) not in found, f"duplicate {key}"
                found[rec["split"], key] = (int(members[key + ".cls"]), data)
    return found


def test_every_decodable_image_once_with_its_label(tree, converted):
    (_, want), (out, meta) = tree, converted
    samples = read_all(out)
    assert {k: v[0] for k, v in samples.items()} == want["labels"]
    assert meta["classes"] == sorted(WNIDS)
    assert meta["splits"]["train"]["count"] == sum(s == "train" for s, _ in want["labels"])
    assert meta["splits"]["val"]["count"] == sum(s == "val" for s, _ in want["labels"])
    assert sum(r["count"] for r in meta["shards"]) == len(want["labels"])
    assert all(r["count"] <= 4 for r in meta["shards"]) and len(meta["shards"]) >= 6
    assert meta["ignored"] == ["train/n01440764/notes.txt"]


def test_oddities_kept_reencoded_or_skipped_with_reason(tree, converted):
    (root, want), (out, meta) = tree, converted
    samples = {(s, k): data for (s, k), (_, data) in read_all(out).items()}
    for rel, data in want["kept"].items():  # baseline RGB/greyscale/progressive JPEGs: byte for byte
        key = rel.split("/", 1)[1].rsplit(".", 1)[0]
        assert samples["train", key] == data, rel
    assert {r["path"] for r in meta["reencoded"]} == want["reencoded"]
    for rel in want["reencoded"]:
        key = rel.split("/", 1)[1].rsplit(".", 1)[0]
        im = Image.open(io.BytesIO(samples["train", key]))
        assert im.format == "JPEG" and im.mode in ("RGB", "L") and "progressive" not in im.info
        src = Image.open(root / rel)
        # same picture: compare with the source in greyscale (transparency shown on white)
        if src.mode in ("I;16", "I"):
            ref = Image.fromarray((np.asarray(src) // 257).astype(np.uint8))
        else:
            ref = Image.alpha_composite(Image.new("RGBA", src.size, "white"), src.convert("RGBA")).convert(
                "L"
            )
        diff = np.abs(np.asarray(im.convert("L"), float) - np.asarray(ref, float))
        assert im.size == src.size and diff.mean() < 8, (rel, diff.mean())
    got = {x["path"]: x["reason"] for x in meta["skipped"]}
    assert set(got) == set(want["skipped"])
    for rel, prefix in want["skipped"].items():
        assert got[rel].startswith(prefix), (rel, got[rel])
    assert meta["splits"]["train"]["skipped"] == 3 and meta["splits"]["val"]["skipped"] == 1


def test_shards_are_shuffled_and_deterministic(tree, converted, tmp_path):
    out, meta = converted
    first = [k for k in read_all(out) if k[0] == "train"][:8]
    assert len({k.split("/")[0] for _, k in first}) > 1, "shards should mix classes"
    again = cv.convert(tree[0], tmp_path, shard_size=4, workers=1, seed=3, quiet=True)
    assert again["shards"] == meta["shards"]  # same bytes (sha256) whatever the worker count
    other = cv.convert(tree[0], tmp_path / "seed4", shard_size=4, workers=1, seed=4, quiet=True)
    assert [r["sha256"] for r in other["shards"]] != [r["sha256"] for r in meta["shards"]]


@pytest.mark.integration  # launches DALI's wds2idx as a process
def test_index_matches_dali_wds2idx(converted, tmp_path):
    """Our .idx files are byte-identical to what DALI's own wds2idx tool writes."""
    out, meta = converted
    tool = Path(sys.executable).with_name("wds2idx")
    if not tool.exists():
        pytest.skip("DALI's wds2idx is not installed")
    for rec in meta["shards"][:3]:
        ref = tmp_path / (rec["name"] + ".idx")
        subprocess.run(
            [sys.executable, str(tool), str(out / rec["name"]), str(ref)], check=True, capture_output=True
        )
        assert ref.read_text() == (out / rec["name"]).with_suffix(".idx").read_text()


def test_webdataset_reads_keys_and_labels(tree, converted):
    wds = pytest.importorskip("webdataset")
    (_, want), (out, meta) = tree, converted
    got = {}
    for split in ("train", "val"):
        urls = [str(out / r["name"]) for r in meta["shards"] if r["split"] == split]
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"):
            img = sample["jpg"]
            assert img.size[0] > 0 and img.mode in ("RGB", "L")
            got[split, sample["__key__"]] = int(sample["cls"])
    assert got == want["labels"]


def test_dali_cpu_reader_reads_keys_and_labels(tree, converted):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    (_, want), (out, meta) = tree, converted
    got = {}
    for split in ("train", "val"):
        tars = [str(out / r["name"]) for r in meta["shards"] if r["split"] == split]
        n = meta["splits"][split]["count"]

        @pipeline_def(batch_size=n, num_threads=1, device_id=None)
        def pipe(tars=tars):
            jpg, cls = fn.readers.webdataset(
                paths=tars,
                index_paths=[t[:-4] + ".idx" for t in tars],
                ext=["jpg", "cls"],
                missing_component_behavior="skip",
                name="r",
            )
            return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls, jpg

        p = pipe()
        p.build()
        assert p.epoch_size("r") == n
        images, classes, jpgs = p.run()  # one batch = the whole split
        for i in range(n):
            assert images.at(i).ndim == 3 and images.at(i).shape[2] == 3
            member = jpgs[i].source_info().split(":", 2)[2]  # "<tar>:<offset>:<member name>"
            got[split, member[:-4]] = int(bytes(classes.at(i)).decode())
    assert got == want["labels"]


def test_strict_fails_naming_the_files(tree, tmp_path, capsys):
    with pytest.raises(ConvertError, match="no label.*ILSVRC2012_val_00000099|ILSVRC2012_val_00000099"):
        cv.convert(tree[0], tmp_path / "a", strict=True, workers=1, quiet=True)
    assert (
        cv.main(
            [
                "--src",
                str(tree[0]),
                "--out",
                str(tmp_path / "b"),
                "--split",
                "train",
                "--strict",
                "--workers",
                "1",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("error: --strict: 3 input file(s)")
    for name in ("truncated.JPEG", "empty.JPEG", "garbage.JPEG"):
        assert name in err
    assert not (tmp_path / "b" / "dataset.json").exists()


def _interrupt_after(monkeypatch, n: int) -> None:
    """Make the n+1-th shard write die mid-way, leaving a half-written .tar.tmp like a killed run."""
    real, calls = write_shard, []

    def dying(task):
        calls.append(task[2])
        if len(calls) > n:
            (task[0] / (task[2] + ".tmp")).write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(cv, "write_shard", dying)


def test_resume_after_interrupt_gives_the_same_dataset(tree, converted, tmp_path, monkeypatch):
    ref_out, ref = converted
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(ConvertError, match="interrupted"):
        cv.convert(tree[0], out, shard_size=4, workers=1, seed=3, quiet=True)
    monkeypatch.undo()
    done = sorted(p.name for p in out.glob("*.tar"))
    assert len(done) == 3 and list(out.glob("*.tmp")) and not (out / "dataset.json").exists()

    # damage the finished work in the ways a crash or a disk can: a flipped byte, a lost index
    bad, lost = out / done[0], (out / done[1]).with_suffix(".idx")
    data = bytearray(bad.read_bytes())
    data[2000] ^= 0xFF
    bad.write_bytes(bytes(data))
    lost.unlink()
    with open(out / cv.PROGRESS, "a") as log:  # a SIGKILL can cut the progress log mid-line
        log.write('{"name": "train-0000')
    untouched = (out / done[2]).stat().st_mtime_ns

    meta = cv.convert(tree[0], out, shard_size=4, workers=2, seed=3, quiet=True)
    assert meta == ref  # same shard bytes (sha256), counts, skipped and re-encoded files
    assert {k: v[0] for k, v in read_all(out).items()} == {k: v[0] for k, v in read_all(ref_out).items()}
    assert (out / done[2]).stat().st_mtime_ns == untouched, "a good finished shard should be kept"
    assert not list(out.glob("*.tmp")) and not (out / cv.PROGRESS).exists()
    cv.verify(out)


def test_rerun_with_new_shard_size_removes_stale_shards(tree, tmp_path):
    cv.convert(tree[0], tmp_path, split="train", shard_size=2, workers=1, quiet=True)
    meta = cv.convert(tree[0], tmp_path, split="train", shard_size=8, workers=1, quiet=True)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == sorted(r["name"] for r in meta["shards"])
    cv.verify(tmp_path)


def test_splits_converted_separately_survive_an_interrupt(tree, tmp_path, monkeypatch):
    train = cv.convert(tree[0], tmp_path, split="train", shard_size=4, workers=1, quiet=True)
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(ConvertError, match="interrupted"):
        cv.convert(tree[0], tmp_path, split="val", shard_size=2, workers=1, quiet=True)
    monkeypatch.undo()
    assert not (tmp_path / "dataset.json").exists(), "an unfinished folder must not look complete"
    both = cv.convert(tree[0], tmp_path, split="val", shard_size=2, workers=1, quiet=True)
    assert set(both["splits"]) == {"train", "val"} and both["splits"]["train"] == train["splits"]["train"]
    assert [r for r in both["shards"] if r["split"] == "train"] == train["shards"]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == sorted(r["name"] for r in both["shards"])
    cv.verify(tmp_path)


@pytest.mark.parametrize("damage", ["flip", "truncate", "index", "count"])
def test_verify_names_the_first_bad_shard(converted, tmp_path, damage, capsys):
    out = tmp_path / "copy"
    shutil.copytree(converted[0], out)
    meta = json.loads((out / "dataset.json").read_text())
    victim = meta["shards"][2]["name"]
    path = out / victim
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[1500] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:3000])
    elif damage == "index":
        lines = path.with_suffix(".idx").read_text().splitlines()
        path.with_suffix(".idx").write_text("\n".join(lines[:-1]) + "\n")
    else:
        meta["shards"][2]["count"] += 1
        (out / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ShardError, match=victim):
        cv.verify(out)
    assert cv.main(["--verify", str(out)]) == 1
    assert victim in capsys.readouterr().err
    if damage in ("truncate", "index"):  # the structural checks alone (no sha256) catch these too
        with pytest.raises(ShardError, match=victim):
            verify_shard(path)


def test_verify_passes_on_a_good_conversion(converted, capsys):
    assert cv.main(["--verify", str(converted[0])]) == 0
    assert "ok" in capsys.readouterr().out


def test_folder_of_class_folders_and_unknown_val_class(tmp_path):
    for cls in ("b", "a"):
        (tmp_path / "plain" / cls).mkdir(parents=True)
        shutil.copy(PHOTOS / "train/cat/cat_train_00.jpg", tmp_path / "plain" / cls / "x.jpg")
    meta = cv.convert(tmp_path / "plain", tmp_path / "o1", workers=1, quiet=True)
    assert meta["classes"] == ["a", "b"] and meta["splits"] == {
        "train": {"count": 2, "shards": 1, "skipped": 0}
    }

    src = tmp_path / "split"
    (src / "train" / "a").mkdir(parents=True)
    (src / "val" / "zzz").mkdir(parents=True)
    shutil.copy(PHOTOS / "train/cat/cat_train_00.jpg", src / "train/a/x.JPEG")
    shutil.copy(PHOTOS / "val/cat/cat_val_00.jpg", src / "val/zzz/y.JPEG")
    meta = cv.convert(src, tmp_path / "o2", workers=1, quiet=True)
    assert [x["reason"].split(":")[0] for x in meta["skipped"]] == ["unknown class"]


@pytest.mark.parametrize("case", ["missing", "empty", "no_classes", "flat_without_csv"])
def test_bad_input_is_one_clear_line(tmp_path, case, capsys):
    src = tmp_path / "src"
    if case != "missing":
        src.mkdir()
    if case == "no_classes":
        (src / "readme.txt").write_text("x")
    if case == "flat_without_csv":
        (src / "val").mkdir()
        shutil.copy(PHOTOS / "val/cat/cat_val_00.jpg", src / "val/ILSVRC2012_val_00000001.JPEG")
    assert cv.main(["--src", str(src), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and str(src) in err


@pytest.mark.integration  # launches the converter as a process
def test_cli_end_to_end(tree, tmp_path):
    """The real command line (a subprocess): exit status, summary with skipped files and images/s."""
    run = [sys.executable, "-m", "pipeline.convert"]
    ok = subprocess.run(
        run + ["--src", str(tree[0]), "--out", str(tmp_path), "--shard-size", "5", "--workers", "2"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "images/s" in ok.stdout and "skipped train/n01484850/empty.JPEG: empty file" in ok.stdout


@pytest.mark.integration  # bench.synthetic's process pool (2 workers) must write the same files
def test_bench_synthetic_jpegs_are_imagenet_sized_and_convert_as_they_are(tmp_path):
    """bench.synthetic, the benches' one generator: ImageNet's shapes and file sizes, the same files
    whatever the worker count, and baseline JPEGs the converter stores byte for byte."""
    from bench.synthetic import IMAGENET_SIZES, make_imagenet_like

    info = make_imagenet_like(tmp_path / "a", 8, classes=3, workers=1)
    make_imagenet_like(tmp_path / "b", 8, classes=3, workers=2)
    files = sorted((tmp_path / "a").rglob("*.JPEG"))
    assert len(files) == 8 and len({f.parent.name for f in files}) == 3
    assert [f.read_bytes() for f in files] == [
        (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes() for f in files
    ]
    assert len({f.read_bytes() for f in files}) == 8
    for f in files:
        with Image.open(f) as im:
            assert im.size in IMAGENET_SIZES and im.mode == "RGB"
    assert 60 < info["mean_jpeg_kb"] < 200, info  # ImageNet's mean is ~110 KB
    meta = cv.convert(tmp_path / "a", tmp_path / "out", shard_size=4, workers=1, quiet=True)
    assert meta["splits"]["train"]["count"] == 8 and not meta["skipped"] and not meta["reencoded"]
