"""``python -m noxsdk.cli``: the same as ``noxctl``."""

from noxsdk.cli import main

if __name__ == "__main__":
    main()
