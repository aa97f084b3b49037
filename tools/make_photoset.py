"""Write the real-photo crops (edge_effnet.photoset) as PNG files.

    python tools/make_photoset.py photos/ --count 400                  # evaluation crops
    python tools/make_photoset.py calib/ --split calib --count 100     # calibration crops (--calib calib/)
"""
import argparse
import sys

from edge_effnet.errors import UserError
from edge_effnet.evaluate.photoset import calibration_crops, evaluation_crops, write_photoset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--split", choices=("eval", "calib"), default="eval")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--resolution", type=int, default=256, help="side of the written squares (pixels)")
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    try:
        if args.count < 1 or args.resolution < 8:
            raise UserError("--count must be >= 1 and --resolution >= 8")
        crops = evaluation_crops(args.count) if args.split == "eval" else calibration_crops(args.count)
        paths = write_photoset(args.folder, crops, args.resolution, args.force)
    except UserError as exc:
        print(f"make_photoset: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} {args.split} crops ({args.resolution}x{args.resolution} PNG) to {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
