"""`python -m featx` runs the command line (and names itself featx in its messages)."""
from .cli import main

main(prog_name="featx")
