"""Applications over training and evaluation (top layer): the quickstart. Nothing below imports them."""
