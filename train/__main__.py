"""`python -m train [--config FILE] [--key=value ...]` (also the torchrun entry point)."""

from train.cli import main

main()
