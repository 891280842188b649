"""``python -m gpt2_instruct``: the same command line as the ``gpt2-instruct`` script."""

import sys

from gpt2_instruct.cli import main

if __name__ == "__main__":
    sys.exit(main())
