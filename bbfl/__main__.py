"""`python -m bbfl` = the `bbfl` command."""

from bbfl.cli import main

main()
