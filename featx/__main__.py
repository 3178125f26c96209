"""`python -m featx` runs the command line."""
from .cli import main

main()
