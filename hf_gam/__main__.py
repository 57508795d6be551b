"""``python -m hf_gam ...`` is the ``hf-gam`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
