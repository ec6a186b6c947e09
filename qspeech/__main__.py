"""`python -m qspeech ...` is the `qspeech` command."""

from qspeech.cli import main

main()
