"""Infrastructure every layer uses: process groups and collectives (`dist`, `ports`), the errors and exit
codes (`errors`), how every command ends (`cli`), the checkpoint format (`checkpoint/`: layout, parts,
write, read, offline tools), checkpoint checksums (`integrity`), reading untrusted files without
executing them (`safe_load`; the DCP metadata checked before a read: `dcp_checks`) and one owner per output
directory (`lease`; who holds a lease and whether it is stale: `lease_owner`).

The very bottom: it imports nothing of ours (`configs`, `model` and `pipeline` may import it).
"""
