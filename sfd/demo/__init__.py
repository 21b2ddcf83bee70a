"""The CPU demo domain (procedural shapes), its semantic encoder and its judge."""
