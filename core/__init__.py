"""Infrastructure every layer above uses: process groups and collectives (`dist`).

Bottom layer, next to `configs`, `model` and `pipeline`: it imports nothing of ours.
"""
