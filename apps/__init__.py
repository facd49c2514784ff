"""Applications on top of `inversion` and `ldm`: the local web app (`python -m apps.ui`, `make ui`)."""
