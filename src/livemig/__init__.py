"""livemig: discard-aware live migration of virtual machines."""
