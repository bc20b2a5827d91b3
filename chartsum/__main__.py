"""`python -m chartsum`: the same as the `chartsum` command."""

from chartsum.cli import main

if __name__ == "__main__":
    main()
