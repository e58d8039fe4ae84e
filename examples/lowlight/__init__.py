"""The flagship example: raw low-light enhancement (DBF + DBLE)."""
