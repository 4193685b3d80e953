"""python models/build.py NAME [-o PATH] [--seed S]   |   python models/build.py --all [-o DIR]

Build the seeded example models (defer.examples) to files: a thin shell over examples.build.
Writes .h5/.keras files only where told; nothing built here is committed (*.h5 is gitignored).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: quiet its C++ logs

from defer import examples  # noqa: E402
from defer.errors import DeferError  # noqa: E402

log = logging.getLogger("models.build")

DIGITS = "digits_cnn"
NAMES = [*examples.EXAMPLES, DIGITS]
SMALL = [*examples.SMALL_EXAMPLES, DIGITS]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # Keras warns that .h5 is a legacy format
    if args.all == (args.name is not None):
        _parser().error("give exactly one of NAME or --all")
    try:
        if args.all:
            out_dir = args.output or Path(".")
            for name in SMALL:
                _build_one(name, out_dir / f"{name}.h5", args.seed)
        else:
            _build_one(args.name, args.output or Path(f"{args.name}.h5"), args.seed)
    except DeferError as err:
        print(f"build.py: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


def _build_one(name: str, path: Path, seed: int) -> None:
    if name == DIGITS:
        # The trained model also needs its held-out set to measure accuracy: save it next to it.
        import numpy as np

        path, x_test, y_test = examples.digits_cnn(path, seed=seed)
        test_set = path.with_name(f"{path.stem}_test.npz")
        np.savez(test_set, x_test=x_test, y_test=y_test)
        log.info("held-out digits (%d) -> %s", len(y_test), test_set)
    else:
        examples.build(name, path, seed=seed)
    print(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Build a seeded random-weight example model (or the trained digits CNN).",
    )
    parser.add_argument("name", nargs="?", choices=NAMES, help="which model to build")
    parser.add_argument(
        "--all", action="store_true", help=f"build all the small ones: {', '.join(SMALL)}"
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="output file (.h5 or .keras); with --all, a directory "
        "(default: NAME.h5 / the current directory)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed for the weights (default: 0)"
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
