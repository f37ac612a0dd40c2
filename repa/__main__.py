"""`python -m repa ...` (and `accelerate launch -m repa ...`) run the command line."""

from repa.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
