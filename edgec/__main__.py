"""`python -m edgec` and the `edgec` command. Ctrl-C while the CLI's modules load exits 130, never a traceback."""

import sys


def run() -> None:
    try:
        from .cli import main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
