"""`python -m fedmri.cli ...`: the same as the `fedmri` command."""

from fedmri.cli import main

main()
