"""Write a small SID-style folder of real DNG files from photographs that ship with Python packages.

    python -m deployq.examples.lowlight.make_raw build/raw --scenes 4 --size 256
    python -m deployq.examples.lowlight.make_raw build/raw --scenes 2 --size 0 --split test   # whole frames

gives ``short/{id}_00_{t}s.dng`` (the dark frames), ``long/{id}_00_10s.dng`` and ``gt/{id}.png``;
``deployq run`` and ``deployq diff --input`` read the exposure ratio from the SID file names.
"""

from __future__ import annotations

import argparse

from deployq.examples.lowlight.data import SPLITS, write_sid_folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="frame size in raw pixels (0: the whole photograph)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="photographs and cameras of a split (test: a sensor and noise levels training never saw)")
    args = parser.parse_args(argv)
    scenes = write_sid_folder(args.out_dir, args.scenes, args.size or None, seed=args.seed, split=args.split)
    for s in scenes:
        print(f"{s['short']}  (ratio {s['ratio']:g}, ground truth {s['gt']})")


if __name__ == "__main__":
    main()
