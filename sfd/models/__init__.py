"""Model definitions. Each module is pure: importing it builds nothing and changes no state."""
