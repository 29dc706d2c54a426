"""`python -m edgec` and the `edgec` command. Ctrl-C while the CLI's modules load exits 130, never a traceback."""

import os
import sys


def run() -> None:
    try:
        from .cli import main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    if "EDGEC_PIPELINE_RC" in os.environ:  # rank 0 of `--hosts` under mlx.launch: its exit status goes to relaunch
        from .runtime.pipeline import recording

        return recording(main)
    main()


if __name__ == "__main__":
    run()
