#!/usr/bin/env python
"""Generate the embedded demo dataset: procedural captioned scenes with planted defects.

Writes OUT/images/*.png, train.csv, val.csv, defects.csv (ground truth) and spec.json; an existing
output with the same spec is reused unless --force.
"""
from __future__ import annotations

import argparse
import dataclasses

from alchemist.data.demo import DemoSpec, format_summary, generate_demo


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    for f in dataclasses.fields(DemoSpec):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"default {f.default}")
    p.add_argument("--force", action="store_true", help="regenerate even if OUT holds the same spec")
    args = p.parse_args(argv)
    try:
        spec = DemoSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoSpec)})
    except ValueError as e:
        p.error(str(e))
    print(format_summary(generate_demo(args.out, spec, force=args.force)))


if __name__ == "__main__":
    main()
