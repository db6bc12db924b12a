"""``python -m qpert`` (and ``torchrun -m qpert index ...``): the command line."""

from .cli import main

main()
