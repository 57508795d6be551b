"""``python -m hf_gam ...`` is the ``hf-gam`` command."""

from .cli import console_main

if __name__ == "__main__":
    console_main()
