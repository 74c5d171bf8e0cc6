"""python3 -m usv_core.distill --out DIR [options]       train (again: resume), then export
   python3 -m usv_core.distill export --out DIR [--export-rank R]   re-export the last checkpoint
Several GPUs: torchrun --nproc-per-node N -m usv_core.distill --out DIR ..."""

import sys

from .config import from_args
from .loop import main


def run(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        from .dist import close, init
        from .loop import Trainer

        cfg, d = from_args(argv[1:]), init()
        try:
            paths = Trainer(cfg, d).export()
        finally:
            close(d)
        if paths:
            print("exported: " + ", ".join(paths))
        return 0
    main(from_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run())
