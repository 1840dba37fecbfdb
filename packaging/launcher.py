"""Entry point of the frozen app (PyInstaller): the same ``main`` as ``fewshot-studio``."""

import multiprocessing

from fewshot_studio.cli import main

if __name__ == "__main__":
    multiprocessing.freeze_support()
    raise SystemExit(main())
