"""`galaxy bench`: measurements side by side in one run (strategies, backends, decode)."""
