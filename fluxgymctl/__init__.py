"""fluxgymctl: the command-line client of fluxgymd."""
