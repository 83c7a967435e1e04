"""``python -m flowaudit``: the same command line as the ``flowaudit`` console script."""

from .cli.main import main

if __name__ == "__main__":
    main()
