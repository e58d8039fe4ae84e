"""Write a small SID-style folder of real DNG files from photographs in scikit-image (no download).

    python -m deployq.examples.lowlight.make_raw build/raw --scenes 4 --size 256

gives ``short/{id}_00_{t}s.dng`` (the dark frames), ``long/{id}_00_10s.dng`` and ``gt/{id}.png``;
``deployq run`` and ``deployq diff --input`` read the exposure ratio from the SID file names.
"""

from __future__ import annotations

import argparse

from deployq.calib.synthetic import write_sid_folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="frame size in raw pixels")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--split", choices=("train", "val"), default="val",
                        help="photographs of the training or the held-out split")
    args = parser.parse_args(argv)
    scenes = write_sid_folder(args.out_dir, args.scenes, args.size, seed=args.seed, split=args.split)
    for s in scenes:
        print(f"{s['short']}  (ratio {s['ratio']:g}, ground truth {s['gt']})")


if __name__ == "__main__":
    main()
