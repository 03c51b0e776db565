"""`python -m gptft.report DIR`: (re)write the report of a run or sweep folder and print its table."""

from __future__ import annotations

import argparse
import sys

from gptft.errors import ConfigError
from gptft.report.write import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptft.report", description=__doc__)
    parser.add_argument("folder", help="a run folder or a sweep folder (e.g. outputs/lr_sweep/multirun_...)")
    parser.add_argument(
        "--compare",
        action="append",
        metavar="B:A",
        help="compare group B with group A seed by seed (B − A); each side is key=value[,key=value] naming one "
        "group, e.g. --compare 'freeze=upper_qkv:freeze=none'; repeat for more (default: each group against "
        "the first)",
    )
    args = parser.parse_args(argv)
    try:
        print(write_report(args.folder, compare=args.compare))
    except ConfigError as e:
        print(f"gptft.report: error: {e}", file=sys.stderr)
        return 2
    print(f"written to {args.folder.rstrip('/')}/report/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
