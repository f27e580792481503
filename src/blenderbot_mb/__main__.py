"""`python -m blenderbot_mb ...`: the `blenderbot-mb` command."""

from .cli import main

if __name__ == "__main__":
    main()
