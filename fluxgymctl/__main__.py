"""`python -m fluxgymctl`: the same as the fluxgymctl command."""
from .cli import main

main()
