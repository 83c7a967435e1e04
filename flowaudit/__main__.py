"""``python -m flowaudit``: the same command line as the ``flowaudit`` console script."""

from .cli import start

if __name__ == "__main__":
    start()
