"""``python -m tive`` is the ``tive`` command."""

from tive.cli.commands import main

if __name__ == "__main__":
    main()
