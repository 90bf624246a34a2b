"""A folder of images (ImageNet-style or unlabeled) -> shuffled webdataset shards with DALI indices and a
dataset.json.

    python -m pipeline.convert --src FOLDER --out SHARDS [--labels auto|folders|none]
                               [--split train|val|all] [--shard-size N] [--workers N] [--seed S] [--strict]
    python -m pipeline.convert --verify SHARDS

Labelled layouts (--labels folders): SRC/train/<wnid>/*.JPEG, SRC/val/<wnid>/*.JPEG, a flat
SRC/val/*.JPEG labelled by SRC/LOC_val_solution.csv, or SRC/<class>/* (any folder of class folders,
converted as split "train"). Class index = position of the folder name in the sorted train class
folders. --labels none: every image anywhere below SRC is an unlabeled sample (train/ and val/ still
name splits). --labels auto (the default) picks one from the tree (pipeline/discover.py) and the
printed summary says which.

One sample = `<key>.jpg` + `<key>.cls` (ASCII class index; no `.cls` in an unlabeled dataset, whose
dataset.json says "labeled": false); key = the source path relative to its split folder, without
extension, made tar-safe. Every image is fully decoded once: baseline RGB/greyscale
JPEGs are stored byte for byte, everything else decodable (CMYK, PNG named .JPEG, palette, 16-bit) is
re-encoded as a baseline JPEG, and undecodable/truncated/empty files are skipped and recorded.

Nothing is lost silently: every entry that is not converted is listed in dataset.json's `skipped`
with its reason (a file name that is not UTF-8, a dangling symlink, a symlink loop, a pipe, an
unreadable file or folder, an unknown class, an undecodable image); non-image files and hidden
entries (not entered) are listed under `ignored`.
--out may lie inside --src: it is never read as source, nor is any folder holding a converter's
lock file (an earlier output).

Which sample goes into which shard depends only on the seed and the sorted file list, and shard bytes
are deterministic, so a re-run after an interrupt keeps the shards that verify (plan hash + sha256 +
tar/index agreement) and rewrites the others: the result is the same dataset. Shards are written as
`*.tar.tmp` and renamed when complete; finished shards are logged to `.convert-progress.jsonl` until
`dataset.json` is written at the end. One converter at a time writes into a folder (an flock on
`.convert.lock`, which names the holder); Ctrl-C stops it with one line and exit status 130, and an
output folder that is read-only, a file or full is one `error:` line naming the path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.convert_proc import lock_out, sigint_held_back, worker_pool
from pipeline.discover import LABELS, SPLITS, Item, discover
from pipeline.encode import JPEG_QUALITY
from pipeline.errors import ConvertError, ShardError, UserError, one_line
from pipeline.shard_write import FORMAT, output_error, plan_shards, write_shard
from pipeline.shards import dataset_is_labeled, verify_shard

DEFAULT_SHARD_SIZE = 1000  # ~110 MB of ImageNet JPEGs per shard
PROGRESS = ".convert-progress.jsonl"
PREVIOUS = ".dataset-previous.json"  # dataset.json of the last complete run, while a new run is unfinished
SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<i>\d{6})\.(tar|idx)(\.tmp)?$")


class Interrupted(ConvertError):
    """Ctrl-C: finished shards are kept and a re-run resumes; the command exits 130 like a shell."""

    exit_code = 130


# ---------------------------------------------------------------------------------------- verifying


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def verify(out: str | Path) -> None:
    """Re-read every shard of a converted folder; raise ShardError naming the first bad one."""
    out = Path(out)
    meta = _load_json(out / "dataset.json")
    if meta is None or meta.get("format") != FORMAT:
        raise ConvertError(
            f"{out / 'dataset.json'} is missing or unreadable: is {str(out)!r} a converted folder?"
        )
    listed = {s["name"] for s in meta["shards"]}
    for f in sorted(out.iterdir()):
        m = SHARD_RE.match(f.name)
        if m and f.suffix == ".tar" and f.name not in listed:
            raise ShardError(f"{f.name}: shard file not listed in dataset.json")
    counts = dict.fromkeys(meta["splits"], 0)
    labeled = dataset_is_labeled(meta)
    for rec in meta["shards"]:
        samples = verify_shard(out / rec["name"], len(meta["classes"]), rec["sha256"], labeled)
        if len(samples) != rec["count"]:
            raise ShardError(f"{rec['name']}: holds {len(samples)} samples, dataset.json says {rec['count']}")
        counts[rec["split"]] += len(samples)
    for split, info in meta["splits"].items():
        if counts[split] != info["count"]:
            raise ShardError(
                f"split {split}: shards hold {counts[split]} samples, dataset.json says {info['count']}"
            )


# ---------------------------------------------------------------------------------------- converting


def _known_records(out: Path, old: dict, classes: list[str], labeled: bool) -> dict[str, dict]:
    """Records of finished shards from an earlier run into the same folder (complete or interrupted)."""
    records: dict[str, dict] = {}
    if old:
        if dataset_is_labeled(old) != labeled:
            had = "labeled" if dataset_is_labeled(old) else "unlabeled"
            raise ConvertError(
                f"{out} already holds {had} shards ({old.get('source')}); use a new --out or the same --labels"
            )
        if old.get("classes") != classes:
            raise ConvertError(
                f"{out} already holds shards of another class list ({old.get('source')}); use a new --out"
            )
        for s in old["shards"] + old.get("empty_shards", []):
            records[s["name"]] = {**s, "skipped": [], "reencoded": []}
        for key in ("skipped", "reencoded"):
            for r in old.get(key, []):
                if r.get("shard") in records:
                    records[r["shard"]][key].append(r)
    try:
        lines = (out / PROGRESS).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # the line being written when the run was killed
        records[rec["name"]] = rec
    return records


def _check(args: tuple) -> bool:
    return _still_good(*args)


def _still_good(
    out: Path, rec: dict | None, plan: str, items: list[Item], n_classes: int, labeled: bool
) -> bool:
    if rec is None or rec.get("plan") != plan:
        return False
    if rec["count"] == 0:
        return not (out / rec["name"]).exists()
    try:
        samples = verify_shard(out / rec["name"], n_classes, rec["sha256"], labeled)
    except ShardError:
        return False
    kept = {s["path"] for s in rec["skipped"]}
    return samples == [(it.key, it.label) for it in items if it.rel not in kept]


@contextmanager
def _writing(out: Path):
    """OS errors writing below out -> one ConvertError line naming the path."""
    try:
        yield
    except OSError as e:
        where, folder = Path(os.path.realpath(e.filename or out)), Path(os.path.realpath(out))
        inside = where.is_relative_to(folder) or folder.is_relative_to(where)  # or a folder above out
        if not inside or (error := output_error(e, out)) is None:
            raise
        raise error from None


def _rewrite(path: Path, text: str) -> None:
    """Replace path's content atomically."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk gets its space back
        raise


def _run(tasks: list, workers: int, total: int, quiet: bool, on_done) -> None:
    from tqdm import tqdm

    bar = None
    try:
        with sigint_held_back():  # a Ctrl-C inside tqdm's constructor would leave a half-built bar
            bar = tqdm(total=total, unit="img", disable=quiet, desc="convert", smoothing=0.05)
        if workers == 1:
            for task in tasks:
                on_done(write_shard(task))
                bar.update(len(task[-1]))
        else:
            with worker_pool(workers) as pool:
                for rec in pool.imap_unordered(write_shard, tasks):
                    on_done(rec)
                    bar.update(rec["count"] + len(rec["skipped"]))
    finally:
        if bar is not None:
            with sigint_held_back():
                bar.close()


def convert(
    src: str | Path,
    out: str | Path,
    split: str = "all",
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    seed: int = 0,
    strict: bool = False,
    quiet: bool = False,
    labels: str = "auto",
) -> dict:
    """Convert a folder of images (labels: auto, folders or none) into shards under out -> the
    dataset.json content."""
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser()
    if split not in (*SPLITS, "all"):
        raise ConvertError(f"--split must be train, val or all, not {split!r}")
    if labels not in LABELS:
        raise ConvertError(f"--labels must be one of {', '.join(LABELS)}, not {labels!r}")
    if shard_size < 1:
        raise ConvertError(f"--shard-size must be >= 1, not {shard_size}")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ConvertError(f"--workers must be >= 1, not {workers}")
    if not src.is_dir():
        raise ConvertError(f"--src {str(src)!r} is not a folder")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {str(out)!r} is a file, not a folder")
    if os.path.realpath(out) == str(src):
        raise ConvertError(
            f"--out {str(out)!r} is --src itself: choose a new folder (it may lie inside --src)"
        )
    with _writing(out):
        out.mkdir(parents=True, exist_ok=True)
        with lock_out(out):
            try:
                return _convert(src, out, split, shard_size, workers, seed, strict, quiet, labels)
            except KeyboardInterrupt:
                raise Interrupted(
                    "interrupted: finished shards are kept; re-run the same command to resume"
                ) from None


def _convert(
    src: Path,
    out: Path,
    split: str,
    shard_size: int,
    workers: int,
    seed: int,
    strict: bool,
    quiet: bool,
    labels: str,
) -> dict:
    """convert() once out exists and is locked."""
    # out inside src (--src D --out D/wds) must not become a class, nor its shards images
    found = discover(src, split, exclude=os.path.realpath(out), labels=labels)
    classes, items, pre_skipped, ignored = found.classes, found.items, found.skipped, found.ignored
    if strict and pre_skipped:
        raise ConvertError(_strict_message(pre_skipped))
    old = next(
        (
            m
            for m in map(_load_json, (out / "dataset.json", out / PREVIOUS))
            if m and m.get("format") == FORMAT
        ),
        {},
    )
    known = _known_records(out, old, classes, found.labeled)

    plans = {s: plan_shards(items[s], s, shard_size, seed) for s in items}
    names = [name for s in plans for name, _, _ in plans[s]]
    stale = [
        f
        for f in out.iterdir()
        if (m := SHARD_RE.match(f.name))
        and m["split"] in plans
        and (f.name.endswith(".tmp") or f.with_suffix(".tar").name not in set(names))
    ]
    candidates = [
        (out, known.get(name), plan, chunk, len(classes), found.labeled)
        for s in plans
        for name, chunk, plan in plans[s]
    ]
    if workers > 1 and sum(c[1] is not None for c in candidates) > 1:  # resuming ImageNet re-reads ~140 GB
        with worker_pool(workers) as pool:
            good = pool.map(_check, candidates, chunksize=1)
    else:
        good = [_check(c) for c in candidates]
    records = {name: c[1] for name, c, ok in zip(names, candidates, good) if ok}
    tasks = [(out, str(src), name, c[2], c[3]) for name, c, ok in zip(names, candidates, good) if not ok]
    if tasks or stale:
        # From here on the folder is incomplete: no dataset.json, and the progress log (plus the
        # previous dataset.json, for splits not converted now) is what a re-run resumes from.
        _rewrite(out / PROGRESS, "".join(json.dumps(r) + "\n" for r in records.values()))
        if (out / "dataset.json").exists():
            os.replace(out / "dataset.json", out / PREVIOUS)
        for f in stale:
            f.unlink()
    todo = sum(len(t[-1]) for t in tasks)
    if not quiet:
        print(
            f"{src}: labels: {found.labels_why}"
            + (f", {len(classes)} classes" if found.labeled else "")
            + "; "
            + ", ".join(f"{s} {len(items[s])} images in {len(plans[s])} shards" for s in plans)
            + f"; {len(records)} shards already done, {len(tasks)} to write with {workers} workers",
            flush=True,
        )

    t0 = time.perf_counter()
    with open(out / PROGRESS, "a") as log:

        def on_done(rec):
            records[rec["name"]] = rec
            try:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            except OSError as e:  # a file object's error names no file: the message would name out
                raise OSError(e.errno, e.strerror, str(out / PROGRESS)) from None

        try:
            _run(tasks, min(workers, max(len(tasks), 1)), todo, quiet, on_done)
        except (ConvertError, OSError):  # a full disk, met by a worker or by the progress log above
            for f in out.iterdir():  # the workers' unfinished shards give their space back
                if SHARD_RE.match(f.name) and f.name.endswith(".tmp"):
                    f.unlink(missing_ok=True)
            raise
    rate = todo / max(time.perf_counter() - t0, 1e-9)

    ordered = [records[name] for s in plans for name, _, _ in plans[s]]
    skipped = pre_skipped + [r for rec in ordered for r in rec["skipped"]]
    if strict and skipped:
        raise ConvertError(_strict_message(skipped))
    settings = {"split": split, "labels": labels, "shard_size": shard_size, "seed": seed}
    meta = _metadata(src, classes, found.labeled, plans, ordered, skipped, ignored, old, settings)
    _rewrite(out / "dataset.json", json.dumps(meta, indent=1) + "\n")
    (out / PROGRESS).unlink(missing_ok=True)
    (out / PREVIOUS).unlink(missing_ok=True)
    if not quiet:
        _summary(meta, todo, rate)
    return meta


def _metadata(src, classes, labeled, plans, ordered, skipped, ignored, old, settings) -> dict:
    # splits converted earlier into the same folder (e.g. --split train, then --split val) are kept
    carried = (
        [s for s in old.get("shards", []) if s["split"] not in plans] if old.get("classes") == classes else []
    )
    keep = {s["split"] for s in carried}
    splits = {s: v for s, v in old.get("splits", {}).items() if s in keep}
    for s in plans:
        recs = [r for r in ordered if r["split"] == s]
        splits[s] = {
            "count": sum(r["count"] for r in recs),
            "shards": sum(r["count"] > 0 for r in recs),
            "skipped": sum(x["split"] == s for x in skipped),
        }
    fields = ("name", "split", "count", "bytes", "sha256", "plan")
    return {
        "format": FORMAT,
        "source": str(src),
        "labeled": labeled,  # False: no sample has a .cls (pipeline.shards.dataset_is_labeled)
        "classes": classes,
        "splits": {s: splits[s] for s in SPLITS if s in splits},
        "shards": carried + [{k: r[k] for k in fields} for r in ordered if r["count"] > 0],
        "empty_shards": [{k: r[k] for k in fields} for r in ordered if r["count"] == 0],
        "skipped": [x for x in old.get("skipped", []) if x["split"] in keep] + skipped,
        "reencoded": [x for x in old.get("reencoded", []) if x.get("split") in keep]
        + [{**x, "split": r["split"], "shard": r["name"]} for r in ordered for x in r["reencoded"]],
        "ignored": ignored,
        # settings that determine the shards (not --workers: any worker count writes the same bytes)
        "settings": {**settings, "jpeg_quality": JPEG_QUALITY},
    }


def _strict_message(skipped: list[dict]) -> str:
    shown = "; ".join(f"{x['path']} ({x['reason']})" for x in skipped[:10])
    more = f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    return f"--strict: {len(skipped)} input file(s) cannot be converted: {shown}{more}"


def _summary(meta: dict, done: int, rate: float) -> None:
    for s, info in meta["splits"].items():
        what = "samples" if meta["labeled"] else "unlabeled samples"
        print(f"{s}: {info['count']} {what} in {info['shards']} shards, {info['skipped']} skipped")
    for x in meta["skipped"][:20]:
        print(f"  skipped {x['path']}: {x['reason']}")
    if len(meta["skipped"]) > 20:
        print(f"  ... {len(meta['skipped']) - 20} more skipped files are listed in dataset.json")
    if meta["reencoded"]:
        print(f"re-encoded {len(meta['reencoded'])} non-baseline images as JPEG (listed in dataset.json)")
    print(f"converted {done} images at {rate:.0f} images/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.convert", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--src", help="folder of images: ImageNet-style (train/, val/, class folders) or unlabeled"
    )
    p.add_argument("--out", help="folder for shards and dataset.json (re-running resumes)")
    p.add_argument(
        "--labels",
        default="auto",
        choices=LABELS,
        help="folders: class folders are labels (ImageNet-style); none: every image is an unlabeled sample, "
        "folders are ignored; auto (default): folders for an ImageNet-style tree, else none",
    )
    p.add_argument("--split", default="all", choices=("train", "val", "all"))
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle across shards")
    p.add_argument("--strict", action="store_true", help="fail if any input file cannot be converted")
    p.add_argument("--verify", metavar="DIR", help="only check the shards in DIR against dataset.json")
    args = p.parse_args(argv)
    try:
        if args.verify:
            verify(args.verify)
            meta = json.loads((Path(args.verify) / "dataset.json").read_text())
            print(
                f"{args.verify}: ok, {len(meta['shards'])} shards, "
                + ", ".join(f"{s} {v['count']} samples" for s, v in meta["splits"].items())
                + ("" if dataset_is_labeled(meta) else ", unlabeled")
            )
            return 0
        if not args.src or not args.out:
            p.error("--src and --out are required (or --verify DIR)")
        convert(
            args.src,
            args.out,
            args.split,
            args.shard_size,
            args.workers,
            args.seed,
            args.strict,
            labels=args.labels,
        )
        return 0
    except KeyboardInterrupt:  # outside convert(): --verify, or before the conversion started
        print("error: interrupted", file=sys.stderr)
        return Interrupted.exit_code
    except UserError as e:
        print(one_line(e), file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 1


if __name__ == "__main__":
    status = main()
    # Done (or reported): a Ctrl-C now would only kill the interpreter's shutdown with SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)
