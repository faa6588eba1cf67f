"""``python -m rest_fast ...`` == ``rest-fast ...`` (also what ``torchrun -m rest_fast`` runs)."""

from rest_fast.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
