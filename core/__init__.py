"""Infrastructure every layer uses: process groups and collectives (`dist`), the errors and exit codes (`errors`),
how every command ends (`cli`).

The very bottom: it imports nothing of ours (`configs`, `model` and `pipeline` may import it).
"""
