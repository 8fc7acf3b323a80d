"""``python -m llfc`` (and ``torchrun -m llfc``): the same entry point as the ``llfc`` command."""

from llfc.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
