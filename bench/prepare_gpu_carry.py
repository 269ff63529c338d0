"""Build gpu_carry/ (gitignored): the data bench/efficacy_gpu.py needs on the GPU machine, where
../shared does not travel and the repo plus carried folders may hold 64 MiB in all.

    python bench/prepare_gpu_carry.py                     # data only (the GPU image has sacrebleu etc.)
    python bench/prepare_gpu_carry.py --wheels NAME==VER  # also wheels for packages missing there

Contents: Multi30k de/en train, val and test_2016_flickr (as gz, unchanged); IWSLT14 test and
newstest2014 (unchanged); CIFAR-10 train and test repacked losslessly (efficacy_data.pack_cifar10: one
shared JPEG header + each image's scan, all 60,000 images, every JPEG rebuilt byte for byte, checked
here); MANIFEST.json with every file's size. It refuses to finish if the tree that would travel
(git-tracked and untracked-not-ignored files + gpu_carry/) exceeds 64 MiB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA_DIR, REPO_ROOT  # noqa: E402  (path set above so the bench runs from a checkout)
from efficacy_data import pack_cifar10  # noqa: E402

LIMIT = 64 * 2**20
TEXT_FILES = ["multi30k/train.de.gz", "multi30k/train.en.gz", "multi30k/val.de.gz", "multi30k/val.en.gz",
              "multi30k/test_2016_flickr.de.gz", "multi30k/test_2016_flickr.en.gz", "iwslt14-de-en/test.de.gz",
              "iwslt14-de-en/test.en.gz", "wmt-newstest-de-en/newstest2014.de.gz",
              "wmt-newstest-de-en/newstest2014.en.gz"]
# pip download flags for the GPU image's Python (3.12, x86-64 manylinux), from the device tool's notes.
PIP_PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                *[x for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                  for x in ("--platform", p)]]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", type=Path, default=DATA_DIR, help="the shared data folder (default ../shared/data)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "gpu_carry")
    p.add_argument("--wheels", nargs="*", default=[], help="NAME==VERSION wheels to download for the GPU image")
    return p.parse_args(argv)


def travelling_bytes(root: Path) -> int:
    """Bytes of what the device tool sends besides the carried folders: tracked + untracked-not-ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    return sum((root / f).stat().st_size for f in out.decode().split("\0") if f and (root / f).is_file())


def check_pack(zip_path: Path, pack_path: Path, n: int = 500) -> None:
    """The first n images rebuilt from the pack equal the zip's JPEG files byte for byte."""
    import numpy as np

    d = np.load(pack_path)
    header, scans, off = d["header"].tobytes(), d["scans"], d["offsets"]
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(x for x in zf.namelist() if x.endswith(".jpg"))[:n]
        for i, name in enumerate(names):
            if header + scans[off[i]:off[i + 1]].tobytes() != zf.read(name):
                raise ValueError(f"{pack_path}: image {i} ({name}) does not rebuild byte for byte")


def main(argv=None):
    args = parse_args(argv)
    data = args.out / "data"
    for rel in TEXT_FILES:
        src = args.data_dir / rel
        if not src.exists():
            raise ValueError(f"--data_dir {args.data_dir}: missing {rel}")
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, data / rel)
    (data / "cifar10").mkdir(parents=True, exist_ok=True)
    packs = {}
    for split in ("train", "test"):
        zip_path, pack = args.data_dir / "cifar10" / f"{split}.zip", data / "cifar10" / f"{split}.jpgpack.npz"
        if not zip_path.exists():
            raise ValueError(f"--data_dir {args.data_dir}: missing cifar10/{split}.zip")
        packs[split] = pack_cifar10(zip_path, pack)
        check_pack(zip_path, pack)
        print(f"cifar10 {split}: {packs[split]['images']} images, zip {packs[split]['zip_bytes'] / 2**20:.1f} MiB "
              f"-> pack {packs[split]['bytes'] / 2**20:.1f} MiB")
    if args.wheels:
        (args.out / "wheels").mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *PIP_PLATFORM, "-d",
                        str(args.out / "wheels"), *args.wheels], check=True)
    files = {str(f.relative_to(args.out)): f.stat().st_size for f in sorted(args.out.rglob("*"))
             if f.is_file() and f.name != "MANIFEST.json"}
    carry, tree = sum(files.values()), travelling_bytes(REPO_ROOT)
    (args.out / "MANIFEST.json").write_text(json.dumps(
        {"files": files, "carry_bytes": carry, "tree_bytes": tree, "cifar10": packs}, indent=1, sort_keys=True))
    print(f"{args.out}: {carry / 2**20:.1f} MiB in {len(files)} files; with the working tree ({tree / 2**20:.1f} MiB) "
          f"{(carry + tree) / 2**20:.1f} MiB of the 64 MiB the device tool carries")
    if carry + tree > LIMIT:
        raise ValueError(f"{args.out} plus the working tree is {(carry + tree) / 2**20:.1f} MiB, over 64 MiB")


if __name__ == "__main__":
    main()
