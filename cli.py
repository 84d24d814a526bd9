"""`slq`: the command line (`python cli.py ...`, or the `slq` script); it lives in slq.mlops.cli."""

from slq.mlops.cli import app, main

__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
