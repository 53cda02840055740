"""``lorakit doctor``: prints the installation checks of ``lorakit.doctor``."""

from __future__ import annotations

import argparse

HELP = "check the installation: versions, device, bf16, embedded model, data, a tiny step"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_dir", help="data folder to check (default: $LORAKIT_DATA_DIR)")


def run(args: argparse.Namespace) -> int:
    from lorakit.doctor import run_checks

    failed = 0
    for ok, name, detail in run_checks(args.data_dir):
        print(f"  {'✅' if ok else '❌'} {name:<22} {detail}")
        failed += not ok
    print("🎉 All checks passed!" if not failed else f"❌ {failed} check(s) failed")
    return 1 if failed else 0
