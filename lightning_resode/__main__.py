"""``python -m lightning_resode …`` is the ``lightning-resode`` console script."""

from .cli import main

main()
