"""``python -m ptg.tracking run [--name NAME] [--params params.yaml] -- COMMAND ...`` and ``... backfill [--dir D]``."""

import argparse
import logging
import sys
from collections.abc import Sequence

from ptg.tracking import PENDING_DIR, backfill, run_command

log = logging.getLogger("ptg.tracking")

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ptg.tracking", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a command (e.g. `dvc repro`) under a new MLflow parent run")
    run.add_argument("--name", help="parent run name (default: 'pipeline <date time>')")
    run.add_argument("--params", default="params.yaml", help="params file logged as the parent's params")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command ...")
    replay = sub.add_parser("backfill", help="replay pending records into the configured MLflow")
    replay.add_argument("--dir", default=str(PENDING_DIR), help="folder of pending records")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s tracking %(levelname)s %(message)s")
    if args.command == "run":
        command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not command:
            ap.error("run: give the command after --, e.g. python -m ptg.tracking run -- dvc repro")
        return run_command(command, args.name, args.params)
    try:
        _, pending = backfill(args.dir)
    except Exception as e:
        log.error("backfill failed: %s: %s", type(e).__name__, e)
        return 1
    return 1 if pending else 0


if __name__ == "__main__":
    sys.exit(main())
