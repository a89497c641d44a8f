"""`python -m ctfs` runs the ctfs command."""

from ctfs.cli import main

main()
